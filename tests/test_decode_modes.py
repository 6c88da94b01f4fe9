"""--decode auto|cpu|gpu: auto picks the CPU path where there is no GPU; gpu without one fails at once, in one line."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import EmbedConfig
from pipeline.decode import gpu_decoding

pytestmark = pytest.mark.skipif(
    __import__("os").path.exists("/dev/nvidiactl"), reason="these tests describe a machine without a GPU"
)


def test_auto_decodes_with_pillow_where_there_is_no_gpu_and_says_why():
    device, why = gpu_decoding("auto")
    assert device is None and "no NVIDIA GPU" in why
    assert gpu_decoding("cpu") == (None, "--decode cpu")


def test_decode_gpu_without_a_gpu_fails_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    rc = main(
        ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--decode", "gpu", "--weights", "random"]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("embedpipe")]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("embedpipe: error: --decode gpu: ") and "--decode auto" in err[0]
    assert not out.exists()


def test_gpu_decoding_cannot_feed_a_separate_decode_stage():
    with pytest.raises(ValueError, match="--decode-stage fused"):
        EmbedConfig(input="x", output="y", decode="gpu", decode_stage="separate")
