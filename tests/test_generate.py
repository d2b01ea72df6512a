import pytest
from PIL import Image

from engine import generate


def test_generate_writes_an_image_of_the_asked_size(tmp_path):
    out = tmp_path / "sub" / "fox.png"
    code = generate.main(["a fox", "--res", "96x64", "--steps", "1", "--device", "cpu", "-o", str(out)])
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (96, 64)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fox.png"]  # no temporary file left beside it
    assert out.stat().st_mode & 0o044 == 0o044  # readable by others, as a file made by open() would be


def test_generate_says_a_synthetic_image_is_noise(tmp_path, capsys):
    out = tmp_path / "fox.jpg"
    assert generate.main(["a fox", "--res", "64", "--steps", "1", "--device", "cpu", "-o", str(out)]) == 0
    assert "synthetic (random weights), so the image is noise" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "JPEG"


def test_an_unwritable_output_fails_before_the_generation(tmp_path, capsys, monkeypatch):
    from engine import engines

    built = []
    monkeypatch.setattr(engines.FluxEngine, "from_pretrained", lambda *a, **k: built.append(1))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = generate.main(["a fox", "--res", "64", "--device", "cpu", "-o", str(blocker / "out.png")])
    assert code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert built == []  # refused before any model was built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--res", "1000"], "not a multiple of 16; use 992 or 1008"),
        (["--steps", "0"], "steps 0 is outside 1..1000"),
        (["--model", "synthetic:nope"], "unknown model variant"),
        (["--preset", "nope"], "unknown preset"),
        (["-o", "out.txt"], "no image suffix"),
        (["--model", "synthetic:flux-schnell", "--res", "128"], r"outside 256..2048"),
    ],
)
def test_generate_rejects_bad_input(argv, message, capsys, tmp_path):
    if "-o" not in argv:
        argv = [*argv, "-o", str(tmp_path / "x.png")]
    code = generate.main(["a fox", "--device", "cpu", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and __import__("re").search(message, err), err


def test_an_existing_folder_is_not_an_image_path(tmp_path, capsys):
    folder = tmp_path / "out.png"
    folder.mkdir()
    assert generate.main(["a fox", "--res", "64", "--device", "cpu", "-o", str(folder)]) == 2
    assert "is a folder; name a file in it" in capsys.readouterr().err


def test_generate_with_a_lora_file_and_its_scale(tmp_path):
    """--lora PATH:SCALE: scale 0 gives the image without the adapter, bit for bit; scale 1 another one."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from engine.lora import synthetic_lora
    from engine.models import synthetic_components

    transformer = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"]
    lora = tmp_path / "style.safetensors"
    save_file(synthetic_lora(transformer, rank=4, seed=1, std=0.3), str(lora))
    images = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{lora}:0"]), ("full", ["--lora", str(lora)])):
        out = tmp_path / f"{name}.png"
        argv = ["a fox", "--res", "64", "--steps", "1", "--device", "cpu", "-o", str(out), *extra]
        assert generate.main(argv) == 0
        images[name] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.array_equal(images["zero"], images["plain"])
    assert np.abs(images["full"] - images["plain"]).max() > 0


@pytest.mark.parametrize("value", ["missing.safetensors", "missing.safetensors:0.5"])
def test_generate_refuses_a_missing_lora_before_building(value, capsys, tmp_path):
    assert generate.main(["a fox", "--device", "cpu", "-o", str(tmp_path / "x.png"), "--lora", value]) == 2
    assert "is not a file" in capsys.readouterr().err


def _files(tmp_path):
    """A file that is not safetensors, one without LoRA factors, one with factors of another model's width."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)},
              str(tmp_path / "wide.safetensors"))  # fmt: skip


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("junk.safetensors", "could not be read.*complete .safetensors"),
        ("other.safetensors", "holds no LoRA factors.*is it a LoRA"),
        ("wide.safetensors", "does not fit this transformer.*another model"),
        ("synthetic:4", "synthetic adapters are engine.bench's"),
        ("other.safetensors:abc", "the scale 'abc' after the file's name is not a number"),
    ],
)
def test_generate_refuses_a_lora_it_cannot_load_in_one_line(value, message, capsys, tmp_path):
    """Each was a traceback (the CPU presets keep diffusers' own load_lora_weights) or a misleading line."""
    _files(tmp_path)
    path = value if value.startswith("synthetic") else str(tmp_path / value)
    argv = ["a fox", "--res", "64", "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "x.png"), "--lora", path]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and __import__("re").search(message, err), err
