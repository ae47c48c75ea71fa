"""The lm-eval wrapper on a local GGUF model: `pretrained=PATH.gguf`, or `pretrained=FOLDER,gguf=NAME`."""

from __future__ import annotations

import math

import pytest
from gguf_fixture import tokens, write_tiny_gguf

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from toroidal.integrations.lm_eval import ToroidalLM, spec_from_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_gguf_file_is_a_pretrained_model(tmp_path):
    path = write_tiny_gguf(tmp_path / "models" / "tiny.gguf")
    assert spec_from_args({"pretrained": str(path.parent), "gguf": path.name}).pretrained == str(path)
    with pytest.raises(ValueError, match="pretrained=FOLDER"):
        spec_from_args({"gguf": path.name})
    scores = []
    for args in (f"pretrained={path},attention=baseline", f"pretrained={path.parent},gguf={path.name}"):
        lm = ToroidalLM.create_from_arg_string(args, {"device": "cpu", "batch_size": 1})
        assert lm.loaded.source["model_kind"] == "gguf" and len(lm.tokenizer) == len(tokens())
        request = Instance("loglikelihood", doc={}, arguments=("the cat sat on", " the mat"), idx=0)
        ((logprob, _),) = lm.loglikelihood([request])
        assert math.isfinite(logprob) and logprob < 0
        scores.append(lm.loaded.attention)
    assert scores == ["baseline", "toroidal"]
