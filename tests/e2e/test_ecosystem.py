"""The ecosystem tools users point at the server, run as their users run them (the `ecosystem`
extra, which `make test` installs; skipped without it except in CI). lm-evaluation-harness 0.4.13's local-completions
with NO tokenizer arguments: it detects the server's tokenizer endpoints (its "remote"
backend) instead of looking for a hub tokenizer; per-item loglikelihoods and generations
equal transformers (base) and PEFT (an adapter)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.support.oracles import greedy_ids
from tests.support.tiny import EOS, decode

pytestmark = pytest.mark.ecosystem


@pytest.fixture(autouse=True)
def lm_eval_installed():
    if importlib.util.find_spec("lm_eval") is None:
        if os.environ.get("CI"):
            pytest.fail("lm-eval is missing: `make test` installs the ecosystem extra")
        pytest.skip("needs lm-eval (pip install -e '.[ecosystem]'; `make test` installs it)")

TASKS = {
    "tiny_mc": """\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """,
    "tiny_gen": """\
        task: tiny_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: exact_match
        """,
}
DOCS = [{"question": "Q: 2+2=", "choices": [" 4", " 5", " four"], "answer": 0},
        {"question": "Colour of the sky:", "choices": [" blue", " green"], "answer": 0},
        {"question": "é → ", "choices": [" ü", "ß"], "answer": 1}]


def oracle_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), with lm-eval's split: a context's trailing spaces belong
    to the continuation."""
    stripped = context.rstrip(" ")
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n, len(whole)))


def oracle_generation(model, tok, context: str, max_tokens: int, until: str) -> str:
    ids = tok(context, add_special_tokens=False)["input_ids"]
    generated = greedy_ids(model, ids, max_tokens)
    if EOS in generated:
        generated = generated[: generated.index(EOS)]
    return decode(generated).split(until)[0]


def test_lm_eval_local_completions_with_its_default_tokenizer(chat_server, tmp_path):
    """`lm_eval --model local-completions --model_args model=NAME,base_url=...` with no tokenizer
    arguments finds the server's tokenizer endpoints; per-item loglikelihoods and generations
    equal transformers (base) and PEFT (adapter)."""
    url, _, hf, peft, tok = chat_server
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, task in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(task).format(data=data))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OPENAI_API_KEY": "unused"}
    for model, oracle in (("tiny-llama", hf), ("my-lora", peft)):
        out = tmp_path / f"out-{model}"
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"model={model},base_url={url}/v1/completions", "--tasks", "tiny_mc,tiny_gen",
               "--include_path", str(tmp_path), "--log_samples", "--output_path", str(out)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-4000:]
        assert "remote tokenizer" in run.stderr.lower()  # auto-detected, not a hub download
        samples = {name: [json.loads(line) for p in sorted(Path(out).rglob(f"samples_{name}_*.jsonl"))
                          for line in p.read_text().splitlines()] for name in TASKS}
        assert len(samples["tiny_mc"]) == len(samples["tiny_gen"]) == len(DOCS)
        for s in samples["tiny_mc"]:  # arguments: (context, " " + choice) per choice, as lm-eval sent them
            got = [float(r[0][0]) for r in s["resps"]]
            want = [oracle_loglikelihood(oracle, tok, a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
            assert len(got) == len(DOCS[s["doc_id"]]["choices"]) and all(
                math.isclose(g, w, abs_tol=1e-4) for g, w in zip(got, want)), (model, got, want)
        for s in samples["tiny_gen"]:
            want = oracle_generation(oracle, tok, DOCS[s["doc_id"]]["question"], 6, "\n")
            assert s["resps"][0][0] == want, model
