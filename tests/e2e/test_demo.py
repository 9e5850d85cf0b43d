"""The embedded model and its demo adapters through a live `serve --demo` (what `make demo` runs).

- each demo adapter measurably changes the greedy text in its style (demo/styles.py measures,
  base vs adapter on the same prompts);
- each one's output equals what its own library (PEFT or AdapterHub `adapters`) computes from
  the shipped files;
- the base model writes language (most of its words are English words of the corpus);
- the README's quick start and API examples run as written.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from adapter_runtime.models import DEFAULT_MODEL_NAME
from demo.styles import STYLES
from server.demo import DEMO_DIR, manifest
from tests.support.live import ROOT, ServerProcess

MANIFEST = manifest()
DEMOS = MANIFEST["adapters"]
PROMPTS = MANIFEST["prompts"]
# per demo: (the adapter's style measure at least, the base model's at most), on greedy text of
# the manifest's prompts; what training measured is in the manifest ("effect")
EXPECT = {
    "lora-shout": (0.8, 0.2), "ia3-title": (0.7, 0.3), "bottleneck-leet": (0.7, 0.2), "compacter-rot13": (0.2, 0.02),
    "madx-abjad": (0.9, 0.75), "madx-snake": (0.7, 0.1), "prefix-snake": (0.3, 0.1), "prompt-title": (0.35, 0.1),
}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    server = ServerProcess("--demo", "--store-dir", str(tmp_path_factory.mktemp("store")))
    yield server.url
    server.stop()


def complete(url: str, prompts, max_tokens: int = 64, **fields) -> list[str]:
    body = {"model": DEFAULT_MODEL_NAME, "prompt": list(prompts), "max_tokens": max_tokens, "temperature": 0, **fields}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def naming(demo: dict) -> dict:
    """The request fields that select a demo: its name, or the MAD-X stack it belongs to."""
    return {"adapters": demo["stack"]} if demo["stack"] else {"model": demo["name"]}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_one_demo_adapter_per_method_in_its_library_format(url):
    assert [d["name"] for d in DEMOS] == list(EXPECT)
    listed = {a["id"]: a for a in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
    assert set(listed) == {d["name"] for d in DEMOS}
    methods = {d["method"] for d in DEMOS}
    assert {"lora", "ia3", "bottleneck", "compacter", "invertible", "prefix", "prompt"} <= methods
    for d in DEMOS:
        assert listed[d["name"]]["format"] == ("peft" if d["library"] == "peft" else "adapterhub")
        assert sum(f.stat().st_size for f in (DEMO_DIR / d["name"]).iterdir()) < 1 << 20  # small enough to commit


def test_base_model_writes_words(url):
    """Most words of the base model's greedy text are words of its training corpus, and not
    one word repeated (the seeded random model this replaces wrote bytes like `\x8e|T\xd7`)."""
    from demo.corpus import documents

    vocabulary = {w.lower() for d in documents() for w in re.findall(r"[A-Za-z]+", d)}
    texts = complete(url, PROMPTS, temperature=0.6, seed=1)  # greedy text of a model this small loops
    words = [w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)]
    assert len(words) >= 20 and len(set(words)) >= 10, texts
    assert mean(w in vocabulary for w in words) >= 0.8, texts


@pytest.mark.parametrize("demo", DEMOS, ids=[d["name"] for d in DEMOS])
def test_demo_adapter_changes_the_text_in_its_style(url, demo):
    measure = STYLES[demo["style"]].measure
    base = complete(url, PROMPTS)
    adapted = complete(url, PROMPTS, **naming(demo))
    at_least, base_at_most = EXPECT[demo["name"]]
    assert mean(map(measure, base)) <= base_at_most, base
    assert mean(map(measure, adapted)) >= at_least, adapted
    assert all(a != b for a, b in zip(adapted, base))


@pytest.mark.parametrize("demo", DEMOS, ids=[d["name"] for d in DEMOS])
def test_demo_adapter_equals_its_library(url, demo):
    """The server's greedy text equals the library's own greedy loop on the shipped files."""
    from demo.train_adapters import base_model, greedy

    model = base_model()
    if demo["library"] == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, DEMO_DIR / demo["name"]).eval()
    else:
        import adapters
        from adapters.composition import Stack

        adapters.init(model)
        names = demo["stack"] or [demo["name"]]
        for name in names:
            model.load_adapter(str(DEMO_DIR / name), load_as=name)
        model.set_active_adapters(Stack(*names) if len(names) > 1 else names[0])
        model.eval()
    expected = greedy(model, PROMPTS[0], n=12)
    assert complete(url, PROMPTS[:1], max_tokens=12, **naming(demo)) == [expected]


def readme_section(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index(f"<!-- {marker}:start -->") : text.index(f"<!-- {marker}:end -->")]


def test_readme_quick_start_runs_as_written(url):
    """Every bash/python block of the README's quick start, in order, against `serve --demo`
    (the `.venv/bin/` the README names is this interpreter's)."""
    blocks = [(m[1], m[2]) for m in re.finditer(r"^```(\w+)\n(.*?)^```", readme_section("quickstart"), re.S | re.M)
              if m[1] in ("bash", "python")]
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    outputs = []
    for lang, code in blocks:
        code = code.replace("http://127.0.0.1:8000", url).replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, f"{lang} block failed:\n{code}\n{r.stdout}\n{r.stderr}"
        outputs.append(r.stdout)
    # one line per model, "NAME  TEXT": every demo adapter's text differs from the base model's
    lines = dict(line.split(maxsplit=1) for line in outputs[0].splitlines() if line.strip())
    assert DEFAULT_MODEL_NAME in lines and all(d["name"] in lines for d in DEMOS if not d["stack"])
    assert all(lines[d["name"]] != lines[DEFAULT_MODEL_NAME] for d in DEMOS if not d["stack"])
    assert STYLES["shout"].measure(lines["lora-shout"]) >= 0.8
    assert "madx-abjad+madx-snake" in outputs[1]


def test_readme_api_examples(url):
    """The README's curl and Python examples, as written, against the embedded model (what `make
    serve` runs; this server has the demo adapters too, which the examples do not use)."""
    blocks = [(m[1], m[2]) for m in re.finditer(r"^```(\w+)\n(.*?)^```", readme_section("api"), re.S | re.M)]
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    for lang, code in blocks:
        code = code.replace("http://127.0.0.1:8000", url)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, f"{lang} example failed:\n{r.stdout}\n{r.stderr}"
        if lang == "bash":
            assert '"object":"text_completion"' in r.stdout.replace(" ", "")
        else:
            assert r.stdout.strip()
