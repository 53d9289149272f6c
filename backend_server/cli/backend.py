"""`facerecon-backend`: run the server, make CURVE keys, ask a running server for its status.

    facerecon-backend serve [--bind tcp://127.0.0.1:5555] [--devices cpu] [--workers N] [--keys DIR]
    facerecon-backend keys generate --dir DIR                 # the server's key pair
    facerecon-backend keys generate --dir DIR --client NAME   # an artist's key pair, authorised
    facerecon-backend status [--connect ADDRESS] [--server-key FILE --client-key FILE]
    facerecon-backend models install ict-facekit        # downloads the pinned upstream files (or --from FOLDER)
    facerecon-backend models install sfm --from FOLDER
    facerecon-backend models list
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from shared_protocol import ProtocolError, limits

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


def default_cpu_workers() -> int:
    """One worker per two cores: each worker's numpy/OpenCV uses a second thread in places."""
    return max(1, (os.cpu_count() or 2) // 2)


def use_models_dir(folder: Path | None) -> None:
    """Make `folder` the models dir of this process and of the workers it spawns."""
    from backend_server.models.store import MODELS_ENV
    if folder is not None:
        os.environ[MODELS_ENV] = str(folder.resolve())


def run_serve(args: argparse.Namespace) -> int:
    from backend_server.devices import parse_devices
    from backend_server.models import store
    from backend_server.server.router import Server, ServerConfig, is_loopback
    try:
        devices = parse_devices(args.devices)
    except ValueError as exc:
        print(f"facerecon-backend: {exc}", file=sys.stderr)
        return 2
    if not 0.0 < args.client_share <= 1.0:
        print(f"facerecon-backend: --client-share must be in (0, 1] (a part of the queue), not "
              f"{args.client_share:g}", file=sys.stderr)
        return 2
    if args.worker_memory_gb is not None and args.worker_memory_gb <= 0:
        print(f"facerecon-backend: --worker-memory-gb must be positive, not {args.worker_memory_gb:g}",
              file=sys.stderr)
        return 2
    use_models_dir(args.models_dir)
    models = ["builtin"]
    for name in store.installed_models():
        try:
            store.load_model(name)             # a stale cache is rebuilt once here, not in every worker
            models.append(name)
        except (OSError, ValueError, ImportError) as exc:
            logging.error("model %s left out: %s", name, exc)
    logging.info("models: %s (from %s)", ", ".join(models), store.models_dir())
    if devices != ["cpu"]:
        from backend_server.render.rasterize_cuda import build_plugin
        build_plugin()
    if args.keys is None and not is_loopback(args.bind):
        if not args.insecure:
            print(f"facerecon-backend: refusing to serve {args.bind} without authentication: anyone who "
                  "can reach it could use this machine. Make keys (facerecon-backend keys generate) and "
                  "pass --keys DIR, or pass --insecure on a network you trust.", file=sys.stderr)
            return 2
        logging.warning("!!! serving %s WITHOUT authentication or encryption (--insecure) !!!", args.bind)
    config = ServerConfig(bind=args.bind, devices=["cpu"] * args.workers if devices == ["cpu"] else devices,
                          max_queued_jobs=args.queue_size, client_share=args.client_share,
                          worker_memory_bytes=worker_memory_bytes(args, len(devices) if devices != ["cpu"]
                                                                  else args.workers),
                          job_timeout_s=args.job_timeout,
                          drain_timeout_s=args.drain_timeout, keys_dir=args.keys, models=tuple(models),
                          warm_texture_size=args.warm_texture_size)
    from backend_server.cli.quiet import quiet_native_logs
    with quiet_native_logs(enabled=not args.verbose):        # the workers' MediaPipe log lines
        try:
            server = Server(config)
        except (OSError, ValueError) as exc:
            print(f"facerecon-backend: cannot start: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:                         # zmq.ZMQError: address in use, bad endpoint
            print(f"facerecon-backend: cannot serve {args.bind}: {exc}", file=sys.stderr)
            return 2
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: server.request_stop())
        return server.run()


def worker_memory_bytes(args: argparse.Namespace, workers: int) -> int:
    """--worker-memory-gb, or this machine's physical memory divided among the workers."""
    if args.worker_memory_gb is not None:
        return int(args.worker_memory_gb * 1024 ** 3)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, workers)


def run_keys_generate(args: argparse.Namespace) -> int:
    from backend_server.server.auth import AUTHORIZED_FOLDER, SERVER_NAME, check_key_name, generate_key_pair
    folder = Path(args.dir)
    if args.client is not None:
        try:
            check_key_name(args.client)
        except ValueError as exc:
            print(f"facerecon-backend: --client: {exc}", file=sys.stderr)
            return 2
    try:
        if args.client is None:
            public, secret = generate_key_pair(folder, SERVER_NAME)
            (folder / AUTHORIZED_FOLDER).mkdir(exist_ok=True)
            print(f"server key pair: {public} (public: give it to every artist) and {secret} (secret: "
                  f"keep it here)\nserve with: facerecon-backend serve --keys {folder} --bind tcp://*:5555")
        else:
            public, secret = generate_key_pair(folder / "clients", args.client)
            authorized = folder / AUTHORIZED_FOLDER
            authorized.mkdir(parents=True, exist_ok=True)
            shutil.copy2(public, authorized / public.name)
            print(f"client key pair for {args.client}: give {secret} and {folder / (SERVER_NAME + '.key')} "
                  f"to {args.client} (add-on preferences: client key file and server key file).\n"
                  f"{public.name} is authorised in {authorized}; restart the server to admit it. "
                  f"Delete it from there to revoke.")
    except FileExistsError as exc:
        print(f"facerecon-backend: {exc}", file=sys.stderr)
        return 1
    return 0


def run_status(args: argparse.Namespace) -> int:
    from shared_protocol.client import Client, load_curve_keys, read_server_public_key
    server_key = read_server_public_key(args.server_key) if args.server_key else None
    client_keys = load_curve_keys(args.client_key) if args.client_key else None
    with Client(args.connect, server_public_key=server_key, client_keys=client_keys) as client:
        try:
            status = client.status(timeout_s=args.timeout)
        except ProtocolError as exc:
            print(f"facerecon-backend: {exc.message}", file=sys.stderr)
            return 1
    print(json.dumps(status.header(), indent=1))
    return 0


def run_models_install(args: argparse.Namespace) -> int:
    from backend_server.models import store
    use_models_dir(args.models_dir)
    kind = store.KINDS[args.kind]
    if args.source is None and args.kind in store.DOWNLOADS:
        return download_and_install(args)
    if args.source is None:
        print(f"facerecon-backend: {args.kind} needs --from (it cannot be downloaded for you). {kind.how_to_get}",
              file=sys.stderr)
        return 2
    if args.url:
        print("facerecon-backend: --url is for a download; give --from or --url, not both", file=sys.stderr)
        return 2
    if args.kind == "eos":
        if not args.name:
            print("facerecon-backend: an eos model needs --name", file=sys.stderr)
            return 2
        source = {"name": args.name, "model": args.source, "blendshapes": args.blendshapes,
                  "landmarks": args.landmarks}
    else:
        source = {"folder": args.source}
    print(f"installing {args.kind} from {args.source} into {store.models_dir()} ...", flush=True)
    try:
        manifest = store.install(args.kind, source)
    except (OSError, ValueError, ImportError) as exc:
        print(f"facerecon-backend: cannot install {args.kind}: {exc}\n{kind.how_to_get}", file=sys.stderr)
        return 1
    return after_install(args, manifest)


def print_installed(manifest: dict) -> None:
    print(f"installed {manifest['name']}: {manifest['vertices']} vertices, {manifest['identity_components']} "
          f"identity components, {len(manifest['expressions'])} expressions, "
          f"{manifest['mediapipe_points_on_surface']}/468 MediaPipe points on its surface (median "
          f"{manifest['mediapipe_to_surface_median_mm']} mm off) "
          f"({manifest['seconds']} s). Use it with --model {manifest['name']} (restart a running server).")


def download_and_install(args: argparse.Namespace) -> int:
    """`models install KIND` without --from: the pinned upstream archive, with a progress bar."""
    from tqdm import tqdm

    from backend_server.download import DownloadError
    from backend_server.models import store
    pinned = store.DOWNLOADS[args.kind]
    url = store.download_url(args.kind, args.url)
    print(f"downloading {pinned.why} from {url}\n  into {store.models_dir() / 'downloads'} (an interrupted "
          "download resumes when run again)", flush=True)
    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=args.kind, disable=args.quiet)

    def on_progress(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if total is not None and done >= total and not bar.disable:
            bar.close()
            bar.disable = True                       # once
            print("checking the files against the pinned digest, then converting them (about 20 s) ...", flush=True)

    try:
        manifest = store.download_and_install(args.kind, url=url, on_progress=on_progress)
    except DownloadError as exc:
        bar.close()
        print(f"facerecon-backend: {exc}\nWithout a download: {store.KINDS[args.kind].how_to_get}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ImportError) as exc:
        bar.close()
        print(f"facerecon-backend: cannot install {args.kind}: {exc}", file=sys.stderr)
        return 1
    bar.close()
    return after_install(args, manifest)


def after_install(args: argparse.Namespace, manifest: dict) -> int:
    """Print what was installed, then calibrate it (unless --calibration-renders 0)."""
    print_installed(manifest)
    if args.calibration_renders <= 0:
        print(f"not calibrated (--calibration-renders 0): run `facerecon-backend models calibrate {manifest['name']}`")
        return 0
    return calibrate_installed(manifest["name"], args.calibration_renders, args.seed, args.device, args.workers,
                               args.view_heads)


def run_models_calibrate(args: argparse.Namespace) -> int:
    from backend_server.models import store
    use_models_dir(args.models_dir)
    if store.read_manifest(args.name) is None:
        installed = ", ".join(store.installed_models()) or "none"
        print(f"facerecon-backend: no installed model {args.name!r} (installed: {installed}); "
              "install it first with `facerecon-backend models install`", file=sys.stderr)
        return 1
    return calibrate_installed(args.name, args.renders, args.seed, args.device, args.workers, args.view_heads)


def calibrate_installed(name: str, renders: int, seed: int, device: str, workers: int,
                        view_heads: int | None = None) -> int:
    """Calibrate installed model `name` to MediaPipe (backend_server/calibration.py) with a progress
    bar, store the result in its cache and print what it gained on held-out renders. view_heads:
    heads rendered in three views for the read-out of a person's photos (None: renders // 2)."""
    from tqdm import tqdm
    from backend_server.calibration import VIEWS_PER_TRIPLE, calibrate, view_heads_for
    from backend_server.devices import parse_devices
    from backend_server.models import store
    from backend_server.models.calibration import MIN_RENDERS
    if renders < MIN_RENDERS:
        print(f"facerecon-backend: a calibration needs at least {MIN_RENDERS} renders (asked for {renders})",
              file=sys.stderr)
        return 2
    try:
        torch_device = parse_devices(device)[0]
    except ValueError as exc:
        print(f"facerecon-backend: {exc}", file=sys.stderr)
        return 2
    view_heads = view_heads_for(renders, view_heads)
    total = renders + VIEWS_PER_TRIPLE * view_heads
    print(f"calibrating {name} to MediaPipe: {renders} synthetic renders, then {view_heads} heads in three "
          f"views each, on {torch_device}, {workers} detection processes ...", flush=True)
    with tqdm(total=total, unit="render", desc=f"calibrate {name}") as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)
        try:
            calibration = calibrate(store.load_model(name), renders, seed, torch_device, workers, progress, view_heads)
        except ValueError as exc:                     # too few renders gave landmarks
            print(f"facerecon-backend: cannot calibrate {name}: {exc}; try more --renders", file=sys.stderr)
            return 1
    path = store.save_calibration(name, calibration)
    facts = calibration.facts
    errors = facts["held_out_vertex_error_mm"]
    print(f"calibrated {name} in {facts['seconds']} s: landmarks placed on {facts['detected_renders']} of "
          f"{facts['renders']} renders; on {facts['held_out_renders']} held-out renders the face-area vertex "
          f"error is {errors['calibrated']} mm (uncalibrated fit {errors['uncalibrated']} mm, mean face "
          f"{errors['mean_face']} mm).")
    if calibration.views is not None and "held_out_neutral_error_mm" in calibration.views.facts:
        views = calibration.views.facts["held_out_neutral_error_mm"]
        print(f"three photos of one person (front and both sides) read together: on "
              f"{calibration.views.facts['held_out_heads']} held-out heads the neutral face-area error is "
              f"{views['three_views']} mm (the three views' one-photo predictions averaged "
              f"{views['mean_of_one_view_predictions']} mm, mean face {views['mean_face']} mm).")
    print(f"Saved {path}; restart a running server to use it.")
    return 0


def run_models_list(args: argparse.Namespace) -> int:
    from backend_server.models import store
    use_models_dir(args.models_dir)
    print(f"models in {store.models_dir()}:")
    print("  builtin       (always there: MediaPipe's 468-point mesh, no coefficients)")
    for name in store.installed_models():
        manifest = store.read_manifest(name)
        if manifest is None:                   # removed or damaged since installed_models() looked
            continue
        stale = store.is_stale(manifest)
        print(f"  {name:13s} {manifest['vertices']} vertices, {manifest['identity_components']} identity, "
              f"{len(manifest['expressions'])} expressions; from {next(iter(manifest['source'].values()))}"
              + (f" (cache to be rebuilt: {stale})" if stale else ""))
    return 0


def add_calibration_options(parser: argparse.ArgumentParser, renders_flag: str) -> None:
    from backend_server.models.calibration import DEFAULT_RENDERS
    parser.add_argument(renders_flag, dest="calibration_renders" if "calibration" in renders_flag else "renders",
                        type=int, default=DEFAULT_RENDERS,
                        help=f"synthetic renders to calibrate on (default {DEFAULT_RENDERS}: minutes on a CPU, "
                        "seconds on a GPU; more renders, a better fit)"
                        + ("; 0 skips the calibration" if "calibration" in renders_flag else ""))
    parser.add_argument("--seed", type=int, default=0, help="calibration seed (same seed and count, same result)")
    parser.add_argument("--device", default="cpu", help="renders on cpu (default) or a GPU such as 0 or cuda:0")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes running the detector and MediaPipe on the renders (default: one per core)")
    parser.add_argument("--view-heads", type=int, default=None,
                        help="heads rendered in three views (front, both sides) to learn how a person's three "
                        "photos read together (default: half the renders; 0 skips it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facerecon-backend", description="FaceRecon backend server.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve reconstruction requests over ZeroMQ")
    serve.add_argument("--bind", default=DEFAULT_ADDRESS, help=f"ZeroMQ address (default {DEFAULT_ADDRESS}, "
                       "loopback only; tcp://*:5555 for the network, with --keys)")
    serve.add_argument("--devices", default="cpu",
                       help="cpu (default), or GPUs such as 0,1 or cuda:0,cuda:1: one worker process each")
    serve.add_argument("--workers", type=int, default=default_cpu_workers(),
                       help=f"CPU worker processes with --devices cpu (default {default_cpu_workers()}: "
                       "one per two cores)")
    serve.add_argument("--queue-size", type=int, default=512, help="queued jobs before 'busy' (default 512)")
    serve.add_argument("--client-share", type=float, default=0.25,
                       help="the part of the queue (jobs and photo bytes) one client may fill, in (0, 1]; "
                       "the rest stays open to other clients (default 0.25: 128 of 512 jobs)")
    serve.add_argument("--worker-memory-gb", type=float,
                       help="memory one worker may use; a job estimated over it (its texture size decides: "
                       "about 2 GB at 4096², 5 GB at 8192²) is refused with over_memory_budget (default: this "
                       "machine's memory shared among the workers)")
    serve.add_argument("--keys", type=Path, help="CURVE keys folder (facerecon-backend keys generate)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --bind without --keys (trusted networks only)")
    serve.add_argument("--job-timeout", type=float, default=600.0, help="seconds before a job's worker is killed")
    serve.add_argument("--drain-timeout", type=float, default=60.0,
                       help="seconds SIGTERM waits for running jobs (default 60)")
    serve.add_argument("--warm-texture-size", type=int, default=limits.DEFAULT_TEXTURE_SIZE,
                       help="texture size prepared before the first job (default 2048)")
    serve.add_argument("--models-dir", type=Path, help="installed models (default $FACERECON_MODELS or "
                       "~/.cache/facerecon/models)")
    serve.add_argument("-v", "--verbose", action="store_true",
                       help="also show the workers' MediaPipe and TensorFlow Lite log lines (hidden by default)")
    serve.set_defaults(run=run_serve)
    keys = commands.add_parser("keys", help="CURVE key pairs").add_subparsers(dest="keys_command", required=True)
    generate = keys.add_parser("generate", help="make the server's key pair, or an artist's with --client")
    generate.add_argument("--dir", default="keys", help="keys folder (default: keys)")
    generate.add_argument("--client", metavar="NAME", help="make and authorise a key pair for this artist")
    generate.set_defaults(run=run_keys_generate)
    status = commands.add_parser("status", help="print a running server's status as JSON")
    status.add_argument("--connect", default=DEFAULT_ADDRESS)
    status.add_argument("--server-key", help="server public key file (server.key) when CURVE is on")
    status.add_argument("--client-key", help="your .key_secret file when CURVE is on")
    status.add_argument("--timeout", type=float, default=5.0)
    status.set_defaults(run=run_status)
    models = commands.add_parser("models", help="install and list morphable face models").add_subparsers(
        dest="models_command", required=True)
    install = models.add_parser("install", help="convert a model's original files into the fast cache")
    install.add_argument("kind", choices=("ict-facekit", "sfm", "eos"))
    install.add_argument("--from", dest="source", type=Path,
                         help="ict-facekit, sfm: the folder of original files; eos: the model's .bin. Without it "
                         "ict-facekit is downloaded from its pinned upstream archive and checked")
    install.add_argument("--url", help="ict-facekit without --from: download this archive (.zip or .tar.xz of the "
                         "same files, e.g. a mirror) instead of the pinned one ($FACERECON_ICT_FACEKIT_URL too)")
    install.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    install.add_argument("--name", help="eos: the name requests use")
    install.add_argument("--blendshapes", type=Path, help="eos: expression blendshapes .bin")
    install.add_argument("--landmarks", type=Path, help="eos: ibug_to_*.txt landmark mapping")
    install.add_argument("--models-dir", type=Path, help="default $FACERECON_MODELS or ~/.cache/facerecon/models")
    add_calibration_options(install, "--calibration-renders")
    install.set_defaults(run=run_models_install)
    calibrate = models.add_parser("calibrate", help="learn how MediaPipe's points sit on a model from synthetic "
                                  "renders of it (install does it too); makes its fit better")
    calibrate.add_argument("name", help="an installed model (facerecon-backend models list)")
    calibrate.add_argument("--models-dir", type=Path, help="default $FACERECON_MODELS or ~/.cache/facerecon/models")
    add_calibration_options(calibrate, "--renders")
    calibrate.set_defaults(run=run_models_calibrate)
    listing = models.add_parser("list", help="the models requests may name")
    listing.add_argument("--models-dir", type=Path)
    listing.set_defaults(run=run_models_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GLOG_minloglevel", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
