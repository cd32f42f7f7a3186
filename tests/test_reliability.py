"""Reliability: crashes, bad checkpoints and hostile archives (issue 8, "Reliability").

* A training process killed with SIGKILL in the middle of an epoch, and again in the middle of
  writing ``last.pt``, resumes from the last complete checkpoint (never a half-written file) and
  ends with exactly the weights and history of an uninterrupted run; resuming with a larger
  epoch count extends the schedule.
* A corrupted checkpoint, a checkpoint of another architecture and params pointing at a missing
  backbone each raise :class:`CheckpointError` naming the file, and the register stage registers
  nothing; an unreachable tracking server is a :class:`TrackingError` naming its URI.
* Archive extraction rejects members that escape the target folder (``../``, absolute paths,
  symbolic and hard links), for zip and tar, before writing anything.

The killed trainer is this file run as a script (``python tests/test_reliability.py train ...``),
so parent and child share the model, data and settings defined here.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # the child trainer: make `components` importable without installing
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_data import NoisyColours  # noqa: E402

from components.config import TrainConfig, load_params  # noqa: E402
from components.data.archives import extract_archive  # noqa: E402
from components.engine import build_loader, fit, load_checkpoint, load_model, save_checkpoint, seed_everything  # noqa: E402
from components.errors import CheckpointError, DataError  # noqa: E402
from components.models.classifier import classification_step  # noqa: E402
from components.models.registry import get_model  # noqa: E402

META = {
    "task": "classification",
    "model_name": "convnet",
    "model_args": {"num_classes": 2, "widths": [8, 16], "hidden": 16},
    "categories": ["red", "blue"],
    "mlflow_run_id": "0123456789abcdef",  # what a stage keeps so that a resumed run logs into the same run
}
STEPS_PER_EPOCH = 6
KILL_TIMEOUT_S = 120.0




def train_cfg(epochs: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch_size=8, lr=1e-2, device="cpu", seed=0, warmup_epochs=0.5,
        max_steps_per_epoch=STEPS_PER_EPOCH, threads=1,
    )


def train(out: Path, epochs: int, *, resume: bool, step=classification_step):
    """The same run in the parent and in the killed children: seeded model, data order, dropout, noise."""
    cfg = train_cfg(epochs)
    seed_everything(cfg.seed)
    model = get_model("classification", "convnet", **META["model_args"])  # dropout: consumes the RNG
    data = NoisyColours(64)
    return fit(
        model, train_loader=build_loader(data, cfg, train=True), val_loader=None, step=step, evaluate=None,
        cfg=cfg, out_dir=out, meta=META, resume=resume,
    )


# --------------------------------------------------------------------------- the child trainer


def _child(argv: list[str]) -> None:
    """``train OUT EPOCHS RESUME {step:N | save}``: train, and stall where the parent will kill us.

    ``step:N`` sleeps inside optimiser step N (1-based, this session), after writing ``OUT/stalled``;
    ``save`` writes half of the next ``last.pt`` temp file, fsyncs it, writes ``OUT/stalled`` and sleeps.
    """
    _, out, epochs, resume, stall = argv
    out = Path(out)
    marker = out / "stalled"
    step = classification_step
    if stall.startswith("step:"):
        stall_at, calls = int(stall.split(":")[1]), [0]

        def step(model, batch, device):  # noqa: F811 - the stalling step of this child
            calls[0] += 1
            if calls[0] == stall_at:
                marker.write_text(str(calls[0]))
                time.sleep(KILL_TIMEOUT_S)
            return classification_step(model, batch, device)
    elif stall == "save":
        real_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            if ".last.pt." not in str(getattr(f, "name", f)):
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            marker.write_text(f.name)
            time.sleep(KILL_TIMEOUT_S)
            f.write(data[len(data) // 2 :])

        torch.save = slow_save
    train(out, int(epochs), resume=resume == "resume", step=step)


def kill_when_stalled(out: Path, epochs: int, *, resume: bool, stall: str) -> None:
    """Start the child trainer, wait until it stalls where asked, and SIGKILL it."""
    marker = out / "stalled"
    marker.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "train", str(out), str(epochs), "resume" if resume else "fresh", stall]
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not marker.exists():
            if child.poll() is not None:
                raise AssertionError(f"trainer exited ({child.returncode}) before stalling:\n{child.stdout.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("trainer did not reach the stall point in time")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


# --------------------------------------------------------------------------- kill -9, then resume


def test_kill_9_mid_epoch_and_mid_save_then_resume_equals_uninterrupted(tmp_path):
    reference = train(tmp_path / "reference", 3, resume=False)
    out = tmp_path / "killed"

    # 1. killed inside epoch 2 (step 2 of it): last.pt is epoch 1's, complete
    kill_when_stalled(out, 3, resume=False, stall=f"step:{STEPS_PER_EPOCH + 2}")
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, STEPS_PER_EPOCH)

    # 2. resumed, then killed half-way through writing epoch 2's last.pt: the old file is untouched
    kill_when_stalled(out, 3, resume=True, stall="save")
    half_written = list(out.glob(".last.pt.*.tmp"))
    assert half_written, "the child was killed before it began writing last.pt"
    with pytest.raises(CheckpointError):
        load_checkpoint(half_written[0])  # what a non-atomic writer would have left as last.pt
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, STEPS_PER_EPOCH)

    # 3. resumed to the end: the same weights, history and run id as the uninterrupted run;
    #    the dead writer's half-written temp file is cleaned up when the run resumes
    resumed = train(out, 3, resume=True)
    assert not any(p.exists() for p in half_written) and not list(out.glob(".*.tmp"))
    final, expected = load_checkpoint(resumed.last_path), load_checkpoint(reference.last_path)
    assert final["mlflow_run_id"] == META["mlflow_run_id"]
    for name, tensor in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=0, atol=0, msg=name)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in reference.history]
    assert resumed.global_step == reference.global_step == 3 * STEPS_PER_EPOCH

    # 4. resuming with a larger epoch count extends the schedule: the cosine is rebuilt over 4 epochs,
    #    so epoch 4 trains at a non-zero learning rate (over 3 epochs it had decayed to 0)
    assert reference.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    extended = train(out, 4, resume=True)
    assert len(extended.history) == 4 and extended.global_step == 4 * STEPS_PER_EPOCH
    assert extended.history[:3] == resumed.history
    four = load_checkpoint(extended.last_path)
    assert four["train_config"]["epochs"] == 4
    moved = max((four["state_dict"][k].float() - v.float()).abs().max().item() for k, v in final["state_dict"].items())
    assert moved > 1e-4, "epoch 4 did not train: the schedule was not extended"


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from components.engine import remove_stale_temp_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: a writer killed before its os.replace
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".last.pt.{dead.pid}.tmp"
        busy = tmp_path / f".best.pt.{alive.pid}.tmp"  # another process still saving here
        mine = tmp_path / f".last.pt.{os.getpid()}.tmp"
        other = tmp_path / ".diverged.json.tmp"  # not a checkpoint temp file: no pid, not ours to judge
        for path in (stale, busy, mine, other):
            path.write_bytes(b"half")
        assert remove_stale_temp_files(tmp_path) == [stale]
        assert not stale.exists() and busy.exists() and mine.exists() and other.exists()
        # fit() cleans its out_dir when a fresh run starts, too
        stale.write_bytes(b"half")
        train(tmp_path, 1, resume=False)
        assert not stale.exists() and busy.exists()
    finally:
        alive.kill()
        alive.wait()


# --------------------------------------------------------------------------- unusable checkpoints


def _tiny_checkpoint(path: Path, **meta) -> Path:
    torch.manual_seed(0)
    model = get_model("classification", "convnet", **META["model_args"])
    return save_checkpoint(path, {**META, **meta, "state_dict": model.state_dict()})


def test_corrupted_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path):
    good = _tiny_checkpoint(tmp_path / "best.pt")
    blob = good.read_bytes()
    for name, data in {"truncated.pt": blob[: len(blob) // 3], "garbage.pt": os.urandom(256), "empty.pt": b""}.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load_model(bad)
        assert err.value.file == str(bad) and err.value.fix
    # resume from a corrupt last.pt: the error names the file, no traceback from torch.load
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(blob[:100])
    with pytest.raises(CheckpointError) as err:
        train(run, 1, resume=True)
    assert err.value.file == str(run / "last.pt")


def test_unsafe_pickle_is_refused_by_weights_only(tmp_path):
    """A checkpoint that would run code when unpickled is refused (``weights_only=True``), not executed."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert err.value.file == str(path)
    assert not marker.exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    # weights of a wider convnet under the name/args of the small one
    torch.manual_seed(0)
    wide = get_model("classification", "convnet", num_classes=2, widths=[16, 32], hidden=16)
    path = save_checkpoint(tmp_path / "other.pt", {**META, "state_dict": wide.state_dict()})
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert err.value.file == str(path) and "convnet" in str(err.value)
    # resume of a run whose last.pt belongs to another model
    run = tmp_path / "run"
    _tiny_checkpoint(run / "last.pt", model_name="yolo", task="detection")
    with pytest.raises(CheckpointError) as err:
        train(run, 1, resume=True)
    assert err.value.file == str(run / "last.pt")
    # a backbone file of another backbone architecture
    from components.models.backbones import build_backbone

    backbone = save_checkpoint(tmp_path / "backbone.pt", {"backbone_arch": "mobilenet_v2", "state_dict": {}})
    with pytest.raises(CheckpointError) as err:
        build_backbone("convnet_small", weights=str(backbone))
    assert err.value.file == str(backbone) and "mobilenet_v2" in str(err.value)


def test_params_pointing_at_a_missing_backbone(tmp_path):
    from components.stages.detect import build_detector

    missing = tmp_path / "outputs" / "pretrain" / "backbone.pt"
    params = load_params(REPO / "params.yaml", [f"detect.yolo.backbone.weights={missing}", "detect.yolo.hidden=16"])
    with pytest.raises(CheckpointError) as err:
        build_detector("yolo", params.detect.yolo, num_classes=2)
    assert err.value.file == str(missing) and "pretrain" in (err.value.fix or "")


@pytest.mark.parametrize(
    "damage",
    [
        "corrupt",
        "other_architecture",
    ],
)
def test_register_refuses_a_bad_checkpoint_and_registers_nothing(tmp_path, monkeypatch, damage):
    from mlflow import MlflowClient

    from components.stages.register import run_register

    monkeypatch.chdir(tmp_path)
    best = Path("outputs/detect/yolo/best.pt")
    best.parent.mkdir(parents=True)
    args = {"num_classes": 2, "image_size": 64, "S": 4, "hidden": 32}
    if damage == "corrupt":
        best.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    else:  # a convnet's weights under the yolo name: loads, but does not fit the architecture
        torch.manual_seed(0)
        convnet = get_model("classification", "convnet", **META["model_args"])
        save_checkpoint(best, {"task": "detection", "model_name": "yolo", "model_args": args, "state_dict": convnet.state_dict(), "categories": ["a", "b"]})
    Path("metrics/detect").mkdir(parents=True)
    Path("metrics/detect/yolo.json").write_text(json.dumps({"test": {"bbox": {"map_50": 0.5}}}))
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(
        REPO / "params.yaml",
        [f"tracking.uri={uri}", "tracking.experiment=reliability", "detect.architectures=[yolo]", "segment.architectures=[]"],
    )
    with pytest.raises(CheckpointError) as err:
        run_register(params)
    # the refusal came before MLflow was touched: no store was even created; if one was, it holds no model
    if db.exists():
        assert MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models() == []
    assert Path(err.value.file).resolve() == best.resolve()


def test_tracking_server_down_is_a_tracking_error(monkeypatch):
    """No server on the port: the stage's run fails at once with the URI named (MLflow's HTTP retries
    turned off here; by default it retries with back-off first, then Prefect retries TrackingError)."""
    from components.config import TrackingConfig
    from components.distributed import find_free_port
    from components.errors import TrackingError
    from components.tracking import start_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{find_free_port()}"
    with pytest.raises(TrackingError) as err:
        with start_run(TrackingConfig(uri=uri, experiment="down"), run_name="train"):
            pytest.fail("a run opened on a server that is down")
    assert err.value.file == uri and "start the server" in (err.value.fix or "")


def test_tracking_server_dying_during_a_run_is_a_tracking_error_and_registers_nothing(tmp_path, monkeypatch, mlflow_db_template):
    """A real loopback ``mlflow server`` is killed in the middle of a stage's run: the next logging call and the
    run's end raise TrackingError naming the URI and the run (no urllib3 traceback), and the registry stays empty."""
    import shutil
    import urllib.request

    from conftest import free_port, stop_process_group
    from mlflow import MlflowClient

    from components.config import TrackingConfig
    from components.errors import TrackingError
    from components.tracking import start_run

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend = ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "artifacts")]
    server = subprocess.Popen([str(REPO / ".venv/bin/mlflow"), "server", *backend, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # by default MLflow retries with back-off first
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        with pytest.raises(TrackingError) as err:
            with start_run(TrackingConfig(uri=url, experiment="dies"), run_name="train") as logger:
                logger.log_metrics({"loss": 1.0}, step=1)
                stop_process_group(server)  # the server dies mid-run
                logger.log_metrics({"loss": 0.5}, step=2)
                pytest.fail("logging to a dead server did not fail")
        assert err.value.file == url and err.value.record == logger.run_id and "--resume" in err.value.fix
        assert "log_metrics" in str(err.value)
        import mlflow

        assert mlflow.active_run() is None  # the dead run does not stay active in this process
    finally:
        stop_process_group(server)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []
    assert client.get_metric_history(logger.run_id, "loss")[0].value == 1.0  # what was logged before the failure is kept


def test_a_registration_failing_half_way_is_rolled_back(tracking_cfg, monkeypatch, tmp_path):
    """The registry refuses the alias after the version was created: the version is deleted again (no half-registered model)."""
    import mlflow
    from mlflow import MlflowClient

    from components.errors import TrackingError
    from components.tracking import connect, register_version

    connect(tracking_cfg)
    with mlflow.start_run():
        mlflow.log_dict({"weights": 1}, "model/weights.json")
        uri = mlflow.get_artifact_uri("model")

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("503 Service Unavailable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(TrackingError) as err:
        register_version(uri, "half", version_description="card")
    assert err.value.record == "half" and "503" in str(err.value) and "could not be deleted" not in str(err.value)
    assert MlflowClient().search_model_versions("name='half'") == []


# --------------------------------------------------------------------------- archives that escape the target


def _zip(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/ok.txt", b"fine")
        for name, blob in members.items():
            zf.writestr(name, blob)
        if symlink is not None:
            info = zipfile.ZipInfo("data/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, symlink)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("data/ok.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        for info in members:
            tf.addfile(info, io.BytesIO(b"evil") if info.isfile() else None)
    return path


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


ESCAPES = {
    "zip-dotdot": lambda p, o: _zip(p / "a.zip", {"data/../../evil.txt": b"evil"}),
    "zip-absolute": lambda p, o: _zip(p / "a.zip", {f"{o}/evil.txt": b"evil"}),
    "zip-symlink": lambda p, o: _zip(p / "a.zip", {}, symlink=str(o)),
    "tar-dotdot": lambda p, o: _tar(p / "a.tar.gz", [_tar_member("data/../../evil.txt")]),
    "tar-absolute": lambda p, o: _tar(p / "a.tar.gz", [_tar_member(f"{o}/evil.txt")]),
    "tar-symlink-out": lambda p, o: _tar(p / "a.tar.gz", [_tar_member("data/link", tarfile.SYMTYPE, str(o)), _tar_member("data/link/evil.txt")]),
    "tar-symlink-dotdot": lambda p, o: _tar(p / "a.tar.gz", [_tar_member("data/link", tarfile.SYMTYPE, "../.."), _tar_member("data/link/evil.txt")]),
    "tar-hardlink-out": lambda p, o: _tar(p / "a.tar.gz", [_tar_member("data/hard", tarfile.LNKTYPE, f"{o}/victim.txt")]),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_archive_members_escaping_the_target_are_rejected(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched")
    archive = ESCAPES[case](tmp_path, outside)
    target = tmp_path / "work" / "extract"
    with pytest.raises(DataError) as err:
        extract_archive(archive, target)
    assert err.value.file == str(archive) and err.value.record
    # nothing written anywhere: neither outside nor (the whole archive is refused) inside the target
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "untouched"
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()
    assert not (target / "data" / "ok.txt").exists()


def _coco_with_escaping_file_names(root: Path, outside: Path) -> Path:
    """Four good images plus two whose file_name points at a real file outside images/ ('..' and absolute)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(outside)
    images, anns = [], []
    names = [f"{i}.png" for i in range(4)] + [f"../{outside.name}", str(outside)]
    for i, name in enumerate(names, start=1):
        if i <= 4:
            Image.new("RGB", (40, 40), (30, 30, 200)).save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": 40, "height": 40})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    return path


def test_coco_file_names_escaping_the_images_folder_are_rejected(tmp_path):
    from components.config import DataConfig
    from components.data.ingest import ingest

    outside = tmp_path / "secret.png"
    source = _coco_with_escaping_file_names(tmp_path / "coco", outside)
    # strict: the first escaping record is a DataError naming the file, the record and the fix
    with pytest.raises(DataError) as err:
        ingest(f"coco:{source}", tmp_path / "strict", cfg=DataConfig(), strict=True)
    assert err.value.file == str(source) and err.value.record == "image 5" and "relative" in err.value.fix
    assert "'..'" in str(err.value)
    assert not (tmp_path / "strict").exists()
    # repair: both are skipped and reported; the dataset holds the four good images only
    summary = ingest(f"coco:{source}", tmp_path / "out", cfg=DataConfig())
    assert sum(summary["splits"].values()) == 4
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    skipped = {d["record"]: d for d in report["decisions"] if "file_name" in d["reason"]}
    assert set(skipped) == {"image 5", "image 6"} and all(d["action"] == "skipped" for d in skipped.values())
    assert "absolute" in skipped["image 6"]["reason"]
    copied = [p for p in (tmp_path / "out" / "images").rglob("*") if p.is_file()]
    assert len(copied) == 4 and all(p.read_bytes() != outside.read_bytes() for p in copied)


def test_ingest_of_a_hostile_archive_is_a_data_error(tmp_path):
    from components.config import DataConfig
    from components.data.ingest import ingest

    archive = _zip(tmp_path / "voc.zip", {"voc/../../evil.xml": b"<annotation/>"})
    with pytest.raises(DataError) as err:
        ingest(f"voc:{archive}", tmp_path / "out", cfg=DataConfig())
    assert err.value.file == str(archive)
    assert not (tmp_path / "evil.xml").exists() and not (tmp_path / "out").exists()


if __name__ == "__main__":
    _child(sys.argv[1:])
