"""The serve-time code answers in an interpreter where torch and transformers cannot be imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("torch", "transformers", "optimum")

# Installed first in the child: any import of a blocked package (or a submodule) raises ImportError.
BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys

    BLOCKED = {BLOCKED!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the import blocker let {{name}} through")
""")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_answers_without_torch(qwen_export, photos):
    argv = ["-m", qwen_export, "--image", photos["astronaut"], "-p", "What is in this image?", "--greedy",
            "--max-new-tokens", "5", "--min-new-tokens", "5", "--json", "--threads", "2"]
    code = BLOCKER + textwrap.dedent(f"""
        import json
        from vlm_core.runtime.generate import main
        rc = main({argv!r})
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"rc": rc, "leaked": leaked}}))
    """)
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    answer, status = json.loads(lines[0]), json.loads(lines[1])
    assert status == {"rc": 0, "leaked": []}, proc.stderr
    assert len(answer["token_ids"]) == 5
    assert answer["image_tokens"] > 0
    assert isinstance(answer["text"], str)


def test_serve_modules_import_without_torch():
    code = ("import vlm_core, vlm_core.runtime.model, vlm_core.runtime.generate, vlm_core.kernels.image, "
            "vlm_core.kernels.sampling, vlm_core.models.qwen3_vl; import sys; "
            "assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr


def test_serve_modules_import_with_torch_blocked():
    code = BLOCKER + "from vlm_core import VisionLanguageModel, SamplingParams\n" \
                     "import vlm_core.runtime, vlm_core.runtime.model, vlm_core.runtime.generate, vlm_core.runtime.chat.template, " \
                     "vlm_core.runtime.output.detokenize, vlm_core.runtime.manifest, vlm_core.runtime.engine.onnx_sessions, " \
                     "vlm_core.kernels.image, vlm_core.kernels.sampling, vlm_core.models, vlm_core.models.qwen3_vl\n"
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr


def test_the_blocker_blocks():
    """The control for the tests above: the child's blocker really makes `import torch` fail."""
    proc = _python(BLOCKER + "import torch.nn\n")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "blocked" in proc.stderr
