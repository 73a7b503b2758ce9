"""scripts/ship_checkpoint.py: a training checkpoint stripped to config, weights and step."""
import torch

from checkpoints import read_checkpoint, save_checkpoint
from common import small_config
from engine import make_optimizer
from scalor import SCALOR
from scripts.ship_checkpoint import main


def test_shipped_checkpoint_keeps_the_weights_and_drops_the_training_state(tmp_path):
    cfg = small_config(seq_len=2, observe_frames=1)
    model = SCALOR(cfg)
    source, target = tmp_path / "ckpt.pt", tmp_path / "small.pt"
    save_checkpoint(str(source), model, make_optimizer(model), 7, cfg, rng={"torch": torch.get_rng_state()},
                    data={"dataset": "sprites"})
    assert main([str(source), str(target)]) == 0
    raw = torch.load(target, weights_only=True)
    assert sorted(raw) == ["config", "data", "format", "model", "step"]
    shipped = read_checkpoint(str(target))
    assert shipped["step"] == 7 and shipped["config"] == cfg and shipped["data"] == {"dataset": "sprites"}
    for name, value in model.state_dict().items():
        assert torch.equal(shipped["model"][name], value)


def test_a_file_that_is_not_a_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    assert main([str(bad), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ship_checkpoint.py: error:") and "\n" not in err
    assert not (tmp_path / "out.pt").exists()


def test_an_unwritable_target_is_one_line_and_exit_2(tmp_path, capsys):
    cfg = small_config(seq_len=2, observe_frames=1)
    source = tmp_path / "ckpt.pt"
    save_checkpoint(str(source), SCALOR(cfg), step=3, cfg=cfg)
    (tmp_path / "file").write_text("x")
    before = source.read_bytes()
    for target, message in ((tmp_path / "file" / "small.pt", "which is a file"),      # its folder is a file
                            (tmp_path, "is a folder: pass a file name"),
                            (source, "is the source"),                               # would lose the training state
                            (tmp_path / "file", "exists: pass --overwrite")):         # e.g. another run's checkpoint
        assert main([str(source), str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ship_checkpoint.py: error: ") and message in err and "\n" not in err
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "file"]
    assert (tmp_path / "file").read_text() == "x"
    assert main([str(source), str(tmp_path / "file"), "--overwrite"]) == 0 and read_checkpoint(str(tmp_path / "file"))["step"] == 3


def test_ctrl_c_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    """save_checkpoint writes a temporary file and renames it: Ctrl-C in the middle removes it and goes on up."""
    import pytest
    cfg = small_config(seq_len=2, observe_frames=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path / "ckpt.pt"), SCALOR(cfg), step=3, cfg=cfg)
    assert list(tmp_path.iterdir()) == []
