"""Issue 18: kill -9 at random moments of every writing command, and two writers on one folder.

For each command (``localize``, ``finetune``, ``train run``, ``models install``, ``convert-reference``,
``evaluate``) on tiny inputs, a seeded generator picks kill times over the median length of recent
uninterrupted runs (a third anywhere, a third in the second half, a third in the last 15 %, where the
writing happens); after each SIGKILL the test checks the invariants:

- the target holds the previous state (byte for byte) or the complete new result, never a mix;
- the next, uninterrupted run succeeds, and afterwards no temporary file or folder (``*.tmp``) is left.

Runs go through a fork server (``Testing/fault_server.py``: torch and the engine imported once), so each
run costs the command's own work, not Python's start-up. The table (kills, violations per command) is
printed and, with ``AFLOC_FAULTS_JSON=PATH``, written as JSON (``benchmarks/faults.py`` writes the
file docs/faults.md quotes, ``benchmarks/results/faults.json``): kills, those that left a temporary
file or folder behind (they landed mid-write), those after which the new result was already in place,
runs, violations. The number of kills per command is ``AFLOC_FAULT_KILLS`` (default 20), the seed
``AFLOC_FAULT_SEED`` (default 18).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from afloc_engine.checkpoint import ModelInfo, load_weights, read_config, save_model

REPO = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("AFLOC_FAULT_KILLS", "20"))
SEED = int(os.environ.get("AFLOC_FAULT_SEED", "18"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
LOCKS = (".afloc.lock", ".models.afloc.lock")

pytestmark = pytest.mark.slow


# --- the fork server -----------------------------------------------------------------------------------
class Server:
    """``Testing/fault_server.py`` as a child process: run(argv, kill_after) -> {rc, killed, seconds}."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fault_server.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=REPO,
        )
        ready = json.loads(self.proc.stdout.readline())
        assert ready["ready"]

    def run(self, argv: list[str], cwd: Path, log: Path, env: dict | None = None, kill_after: float | None = None):
        request = {"argv": argv, "cwd": str(cwd), "log": str(log), "env": env or {}, "kill_after": kill_after}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def results():
    table: dict[str, dict] = {}
    yield table
    lines = ["", f"{'command':<18} {'kills':>5} {'mid-write':>9} {'after':>5} {'runs':>5} {'violations':>10} {'s':>5}"]
    for name, r in table.items():
        lines.append(
            f"{name:<18} {r['kills']:>5} {r['kills_mid_write']:>9} {r['kills_after_new_result']:>5} {r['runs']:>5} "
            f"{r['violations']:>10} {r['seconds']:>5.0f}"
        )
    print("\n".join(lines))
    target = os.environ.get("AFLOC_FAULTS_JSON")
    if target and table:
        payload = {
            "command": "AFLOC_FAULTS_JSON=" + target + " python -m pytest Testing/test_faults.py -q -s",
            "seed": SEED,
            "kills_per_command": KILLS,
            "results": table,
        }
        Path(target).write_text(json.dumps(payload, indent=2) + "\n")


# --- helpers ---------------------------------------------------------------------------------------------
def digest(folder: Path) -> dict[str, str] | None:
    """{relative path: sha256} of every file under ``folder`` (lock files left out), None if absent."""
    if not folder.exists():
        return None
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in LOCKS:
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def strays(root: Path) -> list[str]:
    """Temporary files or folders left anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith((".tmp", ".part")))


@dataclass
class Case:
    """One writing command: how to run trial i, what its complete result is, where to look for leftovers."""

    name: str
    root: Path
    argv: Callable[[int], list[str]]
    target: Callable[[int], Path]
    complete: Callable[[int], str | None]
    """None when the target holds trial i's complete result, else what is wrong."""
    next_argv: Callable[[int], list[str]] | None = None
    env: dict = field(default_factory=dict)
    fresh_target: bool = False
    """Each trial writes a new target (training runs): the previous state is 'absent'."""
    state: Callable[[int], object] | None = None
    """What counts as the previous state (default: the target's file digests)."""


def run_case(case: Case, server: Server, results: dict) -> None:
    rng = random.Random(f"{SEED}:{case.name}")
    logs = case.root / "logs"
    logs.mkdir(exist_ok=True)
    state = case.state or (lambda i: digest(case.target(i)))
    start = time.monotonic()
    first = server.run(case.argv(0), case.root, logs / "0.log", case.env)
    assert first["rc"] == 0, (logs / "0.log").read_text()
    assert case.complete(0) is None, case.complete(0)
    warm = server.run(case.argv(0), case.root, logs / "0b.log", case.env) if case.next_argv is None else first
    clean = [first["seconds"], warm["seconds"]]  # durations of uninterrupted runs; kills are drawn over their median
    violations: list[str] = []
    kills = runs = mid_write = replaced = 0
    trial = 0
    while kills < KILLS and trial < 5 * KILLS:
        trial += 1
        before = state(trial)
        length = float(np.median(clean[-5:]))  # follows the machine's load
        low = rng.choice((0.0, 0.5, 0.85))  # a third anywhere, a third late, a third in the writing at the end
        at = length * rng.uniform(low, 1.0)
        answer = server.run(case.argv(trial), case.root, logs / f"{trial}.log", case.env, kill_after=at)
        runs += 1
        kills += answer["killed"]
        if answer["killed"]:
            mid_write += bool([s for s in strays(case.root) if not s.startswith("logs")])
        if not answer["killed"] and answer["rc"] != 0:
            violations.append(f"trial {trial}: exit {answer['rc']}: {(logs / f'{trial}.log').read_text()[-400:]}")
        after = state(trial)
        if answer["killed"] and after != before:
            replaced += 1
        if after != before and case.complete(trial) is not None:
            violations.append(f"trial {trial} killed at {at:.2f}s: neither the previous state nor the complete new one")
        argv = (case.next_argv or case.argv)(trial)
        again = server.run(argv, case.root, logs / f"{trial}.next.log", case.env)
        runs += 1
        if case.next_argv is None:  # the same command uninterrupted: its length
            clean.append(again["seconds"])
        if again["rc"] != 0:
            violations.append(f"trial {trial}: the next run failed: {(logs / f'{trial}.next.log').read_text()[-400:]}")
        elif (problem := case.complete(trial)) is not None:
            violations.append(f"trial {trial}: after the next run: {problem}")
        left = [s for s in strays(case.root) if not s.startswith("logs")]
        if left:
            violations.append(f"trial {trial}: temporary files left after the next run: {left}")
    results[case.name] = {
        "kills": kills,
        "runs": runs + 1,
        "violations": len(violations),
        "kills_mid_write": mid_write,
        "kills_after_new_result": replaced,
        "seconds": round(time.monotonic() - start, 1),
        "clean_run_seconds": round(float(np.median(clean)), 2),
    }
    assert kills >= KILLS, f"{case.name}: only {kills} kills landed in {trial} trials"
    assert not violations, "\n".join(violations[:5])


# --- inputs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("m") / "tiny", ModelInfo(name="tiny", trained=True))


def _heatmaps_readable(folder: Path, prompts: list[str]) -> str | None:
    try:
        result = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError) as err:
        return f"results.json unreadable: {err}"
    if [p["prompt"] for p in result["prompts"]] != prompts:
        return f"results.json is for {[p['prompt'] for p in result['prompts']]}, not {prompts}"
    for entry in result["prompts"]:
        try:
            sitk.ReadImage(str(folder / entry["heatmap"]))
        except RuntimeError as err:
            return f"{entry['heatmap']}: {err}"
    if not (folder / result["files"]["segmentation"]).is_file():
        return "no segmentation"
    return None


def test_kill_9_localize(server, results, model_dir, tmp_path):
    image = tmp_path / "chest.nrrd"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 10, (400, 480)).astype(np.float32)), str(image)
    )
    out = tmp_path / "out"

    def argv(i: int) -> list[str]:
        return ["localize", str(image), "--prompt", f"finding {i}", "--out", str(out), "--overwrite",
                "--model", str(model_dir), "--device", "cpu", "--progress", "none"]  # fmt: skip

    case = Case(
        "localize",
        tmp_path,
        argv,
        lambda i: out / "chest",
        lambda i: _heatmaps_readable(out / "chest", [f"finding {i}"]),
    )
    run_case(case, server, results)


def test_kill_9_finetune(server, results, model_dir, tmp_path):
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i, (h, w) in enumerate([(72, 64), (64, 64)]):
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.2 * min(h, w)) ** 2
        Image.fromarray(np.clip(rng.normal(80, 12, (h, w)) + 100 * mask, 0, 255).astype(np.uint8)).save(
            tmp_path / f"i{i}.png"
        )
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / f"m{i}.png")
        images.append(str(tmp_path / f"i{i}.png"))
        masks.append(str(tmp_path / f"m{i}.png"))
    store = tmp_path / "adapters"

    def argv(i: int) -> list[str]:
        return ["finetune", "--images", *images, "--masks", *masks, "--finding", "blob", "--out", str(store),
                "--model", str(model_dir), "--device", "cpu", "--progress", "none", "--epochs", "1", "--views", "1",
                "--cv-folds", "0", "--seed", str(i)]  # fmt: skip

    def adapters() -> dict[str, dict]:
        return {p.name: digest(p) for p in store.iterdir() if not p.name.startswith(".")} if store.is_dir() else {}

    seen: dict[int, dict] = {}

    def state(i: int) -> object:
        # the previous adapters must stay as they were; a new one may appear only complete
        now = adapters()
        seen.setdefault(i, now)
        return {k: v for k, v in now.items() if k in seen[i]}

    def complete(i: int) -> str | None:
        from safetensors import safe_open

        for name in adapters():
            folder = store / name
            try:
                meta = json.loads((folder / "adapter.json").read_text())
                json.loads((folder / "metrics.json").read_text())
                with safe_open(str(folder / "adapter.safetensors"), "pt") as fh:
                    list(fh.keys())
            except Exception as err:  # noqa: BLE001 (any failure is an incomplete adapter)
                return f"adapter {name} incomplete: {err}"
            if meta.get("format") is None:
                return f"adapter {name}: adapter.json without a format"
        new = set(adapters()) - set(seen.get(i, {}))
        return None if i not in seen or len(new) <= 2 else f"{len(new)} new adapters from one trial"

    case = Case("finetune", tmp_path, argv, lambda i: store, complete, state=state)
    run_case(case, server, results)


def test_kill_9_train_run(server, results, tmp_path):
    from test_training_data import base_config, make_pairs

    from training.state import is_complete, latest_checkpoint

    manifest = make_pairs(tmp_path / "data", n=8)
    config = base_config(manifest, log={"every": 1, "tensorboard": False, "checkpoint_every": 1})
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))

    def run_dir(i: int) -> Path:
        return tmp_path / f"run{i}"

    def argv(i: int) -> list[str]:
        return ["train", "run", "--config", str(path), "--run-dir", str(run_dir(i)), "--progress", "none"]

    def next_argv(i: int) -> list[str]:
        if latest_checkpoint(run_dir(i) / "checkpoints") is not None:
            return ["train", "run", "--resume", "--run-dir", str(run_dir(i)), "--progress", "none"]
        return argv(i)

    def consistent(i: int) -> str | None:
        """What a kill may leave: LATEST names a complete checkpoint, visible checkpoints and model complete."""
        ckpt = run_dir(i) / "checkpoints"
        pointer = ckpt / "LATEST"
        if pointer.is_file() and not is_complete(ckpt / pointer.read_text().strip()):
            return f"LATEST names an incomplete checkpoint {pointer.read_text().strip()}"
        for folder in ckpt.glob("step-*"):
            if not folder.name.endswith(".tmp") and not is_complete(folder):
                return f"incomplete checkpoint folder {folder.name}"
        model = run_dir(i) / "model"
        if model.exists():
            try:
                read_config(model)
                load_weights(model)
            except Exception as err:  # noqa: BLE001
                return f"incomplete final model: {err}"
        return None

    def complete(i: int) -> str | None:
        if not (run_dir(i) / "model" / "model.safetensors").is_file():
            return "no final model"
        problem = consistent(i)
        if problem:
            return problem
        steps = [row.split(",")[0] for row in (run_dir(i) / "metrics.csv").read_text().splitlines()[1:]]
        if len(steps) != len(set(steps)):
            return f"metrics.csv repeats steps: {steps}"
        return None

    # a kill leaves the previous state (nothing) or a consistent partial run that resumes; 'state' is the
    # consistency check itself: a consistent folder counts as the previous state
    case = Case(
        "train run",
        tmp_path,
        argv,
        run_dir,
        complete,
        next_argv=next_argv,
        fresh_target=True,
        state=lambda i: consistent(i) or "consistent",
    )
    run_case(case, server, results)


def test_kill_9_models_install(server, results, tiny_model, tmp_path, monkeypatch):
    from afloc_engine import registry

    archives, shas = [], []
    for version in ("1", "2"):
        folder = save_model(
            tiny_model, tmp_path / "src" / f"v{version}", ModelInfo(name="m", version=version), dtype=torch.float16
        )
        archive = tmp_path / f"m{version}.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for f in ("config.json", "model.safetensors"):
                zf.write(folder / f, f"m/{f}")
        archives.append(archive)
        shas.append(hashlib.sha256(archive.read_bytes()).hexdigest())
    home = tmp_path / "home"
    monkeypatch.setenv("AFLOC_HOME", str(home))

    def argv(i: int) -> list[str]:
        return ["models", "install", str(archives[i % 2]), "--name", "m", "--force", "--progress", "none"]

    def complete(i: int) -> str | None:
        try:
            record = registry.verify_installed("m")
        except Exception as err:  # noqa: BLE001
            return f"installed model fails verification: {err}"
        if record["sha256"] != shas[i % 2]:
            return f"installed model is {record['sha256'][:12]}, not trial {i}'s archive"
        return None

    case = Case(
        "models install", tmp_path, argv, lambda i: home / "models" / "m", complete, env={"AFLOC_HOME": str(home)}
    )
    run_case(case, server, results)
    assert sorted(p.name for p in (home / "models").iterdir()) == ["m"]


def test_kill_9_convert_reference(server, results, tmp_path):
    from test_convert import VOCAB, D, released_cfg, torchvision_resnet50_state, write_lightning_ckpt
    from transformers import BertConfig, BertModel, BertTokenizer

    bert = tmp_path / "bert"
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    BertModel(cfg).save_pretrained(bert)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(bert)
    gen = torch.Generator().manual_seed(0)
    sd = {f"img_encoder.model.{k}": v for k, v in torchvision_resnet50_state(gen).items()}
    sd["img_encoder.local2_embedder.weight"] = torch.randn(D, 512, 1, 1, generator=gen)
    sd["img_encoder.local_embedder.weight"] = torch.randn(D, 1024, 1, 1, generator=gen)
    sd["img_encoder.global_embedder.weight"] = torch.randn(D, 2048, generator=gen)
    sd["img_encoder.global_embedder.bias"] = torch.randn(D, generator=gen)
    for k, v in BertModel(cfg).state_dict().items():
        sd[f"text_encoder.model.{k}"] = v.clone()
    ref_cfg = released_cfg(**{"model.text.embedding_dim": D, "data.text.word_num": 40})
    ckpt = write_lightning_ckpt(tmp_path / "afloc.ckpt", sd, ref_cfg, tmp_path / "PWNED")
    out = tmp_path / "converted"

    def argv(i: int) -> list[str]:
        return ["convert-reference", str(ckpt), str(out), "--text-model", str(bert), "--overwrite", "--fp16",
                "--name", f"ref{i}"]  # fmt: skip

    def complete(i: int) -> str | None:
        try:
            _, info = read_config(out)
            load_weights(out)
        except Exception as err:  # noqa: BLE001
            return f"converted model incomplete: {err}"
        return None if info.name == f"ref{i}" else f"converted model is {info.name}, not ref{i}"

    run_case(Case("convert-reference", tmp_path, argv, lambda i: out, complete), server, results)


def test_kill_9_evaluate(server, results, model_dir, tmp_path):
    from test_evaluation import write_covid

    data = write_covid(tmp_path / "covid")
    out = tmp_path / "eval"

    def argv(i: int) -> list[str]:
        return ["evaluate", "--data", str(data), "--split", "dev", "--model", str(model_dir), "--out", str(out),
                "--bootstrap", "20", "--seed", str(i), "--baselines", "none", "--device", "cpu",
                "--progress", "none"]  # fmt: skip

    def complete(i: int) -> str | None:
        try:
            result = json.loads((out / "evaluation.json").read_text())
            (out / "evaluation.md").read_text()
        except (OSError, ValueError) as err:
            return f"evaluation incomplete: {err}"
        found = json.dumps(result).count(f'"seed": {i}') > 0
        return None if found else f"evaluation.json is not trial {i}'s (seed {i})"

    run_case(Case("evaluate", tmp_path, argv, lambda i: out, complete), server, results)


# --- two writers on one folder ---------------------------------------------------------------------------
def test_two_trainers_on_one_run_folder_the_second_is_refused(tmp_path):
    from test_training_data import base_config, make_pairs

    from afloc_engine.locks import holder

    manifest = make_pairs(tmp_path / "data", n=8)
    config = base_config(manifest, optim={"batch_size": 4, "lr": 1e-3, "epochs": 50})
    path = tmp_path / "long.json"
    path.write_text(json.dumps(config))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "afloc_engine", "train", "run", "--run-dir", str(run), "--progress", "none"]
    first = subprocess.Popen([*cmd, "--config", str(path)], env=ENV, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while f"PID {first.pid}" not in (holder(run) or ""):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first trainer never took the run folder's lock"
            time.sleep(0.2)
        second = subprocess.run(
            [*cmd, "--config", str(path)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"PID {first.pid}" in lines[0] and "afloc train run" in lines[0], second.stderr
        assert first.poll() is None  # the first goes on undisturbed
    finally:
        first.kill()
        first.wait()
