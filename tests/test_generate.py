import pytest
from PIL import Image

from engine import generate


def test_generate_writes_an_image_of_the_asked_size(tmp_path):
    out = tmp_path / "sub" / "fox.png"
    code = generate.main(["a fox", "--res", "96x64", "--steps", "1", "--device", "cpu", "-o", str(out)])
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (96, 64)
    assert not list(out.parent.glob("*.part*"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--res", "1000"], "not a multiple of 16; use 992 or 1008"),
        (["--steps", "0"], "steps 0 must be at least 1"),
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
