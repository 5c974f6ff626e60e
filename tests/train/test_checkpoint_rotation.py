"""Checkpoint rotation: `keep` counts scheduled checkpoints; a stop's checkpoint is removed by the next one."""

from pathlib import Path

from distill.train.engine import complete_tags, save


class Writer:
    """The one engine method `save` calls, writing a file per tag as DeepSpeed's save_checkpoint does."""

    global_rank = 0

    def save_checkpoint(self, folder: str, tag: str, client_state: dict) -> None:
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)
        (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")


def steps(folder: Path) -> list[int]:
    return [int(t.removeprefix("step-")) for t in complete_tags(folder)]


def test_a_stop_checkpoint_does_not_push_out_a_scheduled_one(tmp_path):
    for step in (10, 20, 30):
        save(Writer(), tmp_path, step, {"stage": "joint"}, keep=3)
    save(Writer(), tmp_path, 37, {"stage": "joint"}, keep=3, scheduled=False)  # stopped at step 37
    assert steps(tmp_path) == [10, 20, 30, 37]  # the stop's checkpoint is the newest: the resume starts there
    save(Writer(), tmp_path, 40, {"stage": "joint"}, keep=3)  # the resumed run's next checkpoint
    assert steps(tmp_path) == [20, 30, 40]  # as in a run that was never stopped


def test_scheduled_checkpoints_rotate_to_the_newest_keep(tmp_path):
    for step in range(1, 6):
        save(Writer(), tmp_path, step, {"stage": "joint"}, keep=2)
    assert steps(tmp_path) == [4, 5]
    assert not (tmp_path / "step-00000003").exists()
