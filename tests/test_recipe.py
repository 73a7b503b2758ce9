"""The sprite training recipe (common.sprites_config, train.py --recipe sprites) and the background
estimate (data.estimate_background) that decides its phase_no_background."""
import pytest

import train
from common import RECIPES, SPRITES_BACKGROUND, small_config, sprites_config
from data import estimate_background, make_sprites


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run fastest on one thread


def test_sprites_recipe_values():
    cfg = sprites_config()
    assert (cfg.batch_size, cfg.lr, cfg.tau_ep, cfg.z_pres_anneal_end_value) == (64, 3e-4, 4000.0, 1e-9)
    assert (cfg.bg_what_dim, cfg.using_bg_sbd) == (64, False)          # a background that can hold a texture
    small = small_config()
    changed = cfg.diff(small)
    assert set(changed) == {"batch_size", "lr", "tau_ep", "z_pres_anneal_end_value", "bg_what_dim",
                            "using_bg_sbd"}                            # the --small sizes otherwise
    assert cfg.phase_no_background is False and cfg.first_frame_rejection is False     # not hard-coded
    assert sprites_config(lr=1e-3).lr == 1e-3
    assert RECIPES["sprites"] is sprites_config
    with_background = sprites_config(background=True)
    assert with_background.diff(cfg) == {k: (v, getattr(cfg, k)) for k, v in SPRITES_BACKGROUND.items()}
    assert SPRITES_BACKGROUND == dict(phase_bg_alpha_curriculum=True, bg_alpha_curriculum_steps=1000,
                                      bg_alpha_curriculum_detach_tracked=True, bg_group_norm=False, bg_colour_init=True)
    assert sprites_config(background=True, bg_group_norm=True).bg_group_norm is True          # changes win


@pytest.mark.parametrize("preset, has_background", [("easy", False), ("spmot", False), ("crowded", False),
                                                     ("few", True), ("dynamic_bg", True), ("stream", True)])
def test_background_estimate(preset, has_background):
    data = make_sprites(preset, seq_len=5, num_sequences=20, seed=2)
    estimate = estimate_background(data, num_sequences=6)
    assert estimate["has_background"] is has_background
    assert estimate["sequences"] == 6
    if has_background:
        assert estimate["black_fraction"] < 0.05
    else:
        assert estimate["black_fraction"] > 0.6


def test_recipe_flag_config_and_background_from_the_data(tmp_path, capsys):
    def setup(*flags):
        args = train.build_parser().parse_args(
            ["--recipe", "sprites", "--seq-len", "3", "--batch-size", "2", "--num-sprite-sequences", "8",
             "--workers", "0", "--device", "cpu", "--ckpt-dir", str(tmp_path / "ck"),
             "--summary-dir", str(tmp_path / "sum"), *flags])
        return train.setup(args).cfg

    black = setup("--preset", "easy")
    assert black.phase_no_background is True
    assert (black.lr, black.tau_ep, black.z_pres_anneal_end_value, black.batch_size) == (3e-4, 4000.0, 1e-9, 2)
    out = capsys.readouterr().out
    assert "phase_no_background=True (estimated from the frames" in out and "with a background adds" not in out
    assert all(getattr(black, k) == getattr(small_config(), k) for k in SPRITES_BACKGROUND)   # none of them
    textured = setup("--preset", "few")
    assert textured.phase_no_background is False
    assert all(getattr(textured, k) == v for k, v in SPRITES_BACKGROUND.items())               # the background's
    assert (textured.lr, textured.batch_size) == (3e-4, 2)
    out = capsys.readouterr().out
    assert "phase_no_background=False (estimated" in out
    assert ("with a background adds bg_group_norm=False, bg_colour_init=True, phase_bg_alpha_curriculum=True, "
            "bg_alpha_curriculum_steps=1000, bg_alpha_curriculum_detach_tracked=True (README, 'Recipe'") in out
    told = setup("--preset", "few", "--bg-alpha-curriculum-steps", "300", "--bg-group-norm")      # flags given win
    assert (told.bg_alpha_curriculum_steps, told.bg_group_norm, told.bg_colour_init) == (300, True, True)
    out = capsys.readouterr().out
    assert "adds bg_colour_init=True, phase_bg_alpha_curriculum=True, bg_alpha_curriculum_detach_tracked=True (" in out
    chosen = setup("--preset", "easy", "--no-phase-no-background")                              # the user's choice
    assert chosen.phase_no_background is False and chosen.bg_colour_init and chosen.phase_bg_alpha_curriculum
    assert "estimated" not in capsys.readouterr().out
    assert setup("--preset", "few", "--phase-no-background").phase_bg_alpha_curriculum is False
    args = train.build_parser().parse_args(["--recipe", "sprites", "--lr", "1e-3"])
    assert train.make_config(args, None) == sprites_config(lr=1e-3)                          # flags given win
