"""`facerecon`: batch reconstruction and quality evaluation from the command line.

    facerecon reconstruct PHOTO_OR_DIR... -o OUT [--face N|all] [--texture-size 2048] ...
    facerecon reconstruct --demo -o OUT        # matplotlib's sample portrait
    facerecon reconstruct PHOTOS... --format obj,glb,usdc  # also glTF 2.0 and USD
    facerecon reconstruct PHOTOS... --model ict-facekit   # an installed morphable model
    facerecon reconstruct --person A.jpg B.jpg C.jpg -o OUT   # one head from photos of one person
    facerecon reconstruct --people DIR -o OUT  # each sub-folder of DIR: one person, one head
    facerecon evaluate PHOTO_OR_DIR... [--model NAME] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from backend_server.pipeline.batch import CtrlC, OutcomeStatus, Person, PhotoOutcome
from shared_protocol import DEFAULT_OUTPUTS, OUTPUT_KINDS, ProtocolError, ReconstructOptions, limits

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
FORMATS = {                         # --format name -> the output kinds it writes (the JSON always comes too)
    "obj": tuple(kind for kind in DEFAULT_OUTPUTS if kind != "json"),   # .obj .mtl .png (+ neutral, shape keys)
    "glb": ("glb",),                # glTF 2.0 binary, texture inside
    "usdc": ("usdc", "png"),        # USD crate file and the texture it refers to
}
UV_ONLY_OUTPUTS = ("png", "json")


def demo_photo() -> Path:
    import matplotlib
    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def gather_photos(inputs: list[str]) -> list[Path]:
    """Files as given; folders searched recursively for photo suffixes (a link that leads nowhere
    is kept, and fails with its reason in the summary). Sorted, duplicates removed."""
    photos: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            photos += sorted(p for p in path.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES
                             and (p.is_symlink() or p.is_file()))
        else:
            photos.append(path)
    return list(dict.fromkeys(photos))


def output_stems(photos: list[Path]) -> dict[Path, str]:
    """A distinct output stem per photo (a.jpg and a.png in one batch become a and a_png)."""
    from backend_server.pipeline.export import safe_stem
    stems: dict[Path, str] = {}
    taken: set[str] = set()
    for photo in photos:
        stem = safe_stem(photo.name)
        if stem in taken:
            stem = safe_stem(f"{stem}_{photo.suffix.lstrip('.')}")
        n = 2
        base = stem
        while stem in taken:
            stem, n = f"{base}_{n}", n + 1
        taken.add(stem)
        stems[photo] = stem
    return stems


def gather_people(args: argparse.Namespace) -> list[tuple[Person, str]]:
    """--person (one person, named after its first photo) and --people (a person per sub-folder,
    named after it; its photos sorted): (Person, output stem) pairs. Raises ValueError for a
    person with no photo or more than limits.MAX_PERSON_PHOTOS."""
    from backend_server.pipeline.export import safe_stem
    people: list[tuple[Person, str]] = []
    if args.person:
        photos = tuple(Path(p) for p in args.person)
        people.append((Person(photos, photos[0]), safe_stem(photos[0].name)))
    if args.people:
        root = Path(args.people)
        if not root.is_dir():
            raise ValueError(f"--people {root}: not a folder")
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            photos = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES))
            people.append((Person(photos, folder), safe_stem(folder.name)))
    for person, _ in people:
        if not 1 <= len(person.photos) <= limits.MAX_PERSON_PHOTOS:
            raise ValueError(f"{person.source}: {len(person.photos)} photos; a person takes 1 to "
                             f"{limits.MAX_PERSON_PHOTOS}")
    return people


def parse_device(value: str) -> list[str]:
    from backend_server.devices import parse_devices
    try:
        return parse_devices(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_reconstruct(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from backend_server.pipeline.batch import marker_name, photo_is_done, remove_partial_files, run_batch
    if args.demo:
        args.inputs = [str(demo_photo())] + args.inputs
    if not args.inputs and not args.person and not args.people:
        print("facerecon reconstruct: give photos or folders, --person PHOTOS, --people DIR, or --demo",
              file=sys.stderr)
        return 2
    if (args.person or args.people) and args.face == -1:
        print("facerecon reconstruct: --face all does not go with --person/--people (one head per person)",
              file=sys.stderr)
        return 2
    try:
        people = gather_people(args)
    except ValueError as exc:
        print(f"facerecon reconstruct: {exc}", file=sys.stderr)
        return 2
    if not model_is_available(args):
        return 2
    photos = gather_photos(args.inputs)
    out_dir = Path(args.output)
    options = ReconstructOptions(face=args.face, texture_size=args.texture_size, model=args.model,
                                 outputs=UV_ONLY_OUTPUTS if args.uv_only else outputs_of(args.format),
                                 subdivision=args.subdivision, lit_texture=args.lit_texture)
    stems = output_stems(photos)
    outcomes: list[PhotoOutcome] = []
    todo: list[tuple[Path | Person, str]] = []
    items: list[tuple[Path | Person, str]] = [(photo, stems[photo]) for photo in photos]
    for item, stem in items + list(people):
        source = item.source if isinstance(item, Person) else item
        if not args.overwrite and photo_is_done(out_dir, stem, options):
            outcomes.append(PhotoOutcome(source, OutcomeStatus.SKIPPED, f"already done "
                                         f"({marker_name(stem, options)}); --overwrite redoes it"))
        else:
            todo.append((item, stem))
    progress = tqdm(total=len(todo), unit="head" if people else "photo", disable=args.quiet or not todo)

    ctrl_c = CtrlC()

    def on_outcome(outcome: PhotoOutcome) -> None:
        outcomes.append(outcome)
        progress.update(1)
        if outcome.status is OutcomeStatus.FAILED:
            progress.write(f"failed: {outcome.photo}: {outcome.detail}")
        ctrl_c.check()

    try:
        with ctrl_c:
            report = run_batch(args.device, todo, out_dir, options, on_outcome, workers=args.workers,
                               batch_size=max(1, args.batch_size))
            ctrl_c.check()
    except KeyboardInterrupt:
        progress.close()
        remove_partial_files(out_dir)
        done = sum(o.status is OutcomeStatus.DONE for o in outcomes)
        failed = sum(o.status is OutcomeStatus.FAILED for o in outcomes)
        print(f"\ninterrupted: {done} done, {failed} failed, {len(todo) - done - failed} not finished; run the "
              "same command again to do the rest (finished photos are skipped)", file=sys.stderr)
        return 130
    finally:
        progress.close()
    if todo and report.gpu:
        gpus = ", ".join(f"{d}: {g['faces']:.0f} faces, peak {g['peak_mb']:.0f} MB" for d, g in report.gpu.items())
        print(f"{report.photos_per_s:.1f} photos/s on {len(args.device)} GPU(s) ({gpus})")
    return summarize(outcomes, out_dir)


def summarize(outcomes: list[PhotoOutcome], out_dir: Path) -> int:
    done = [o for o in outcomes if o.status is OutcomeStatus.DONE]
    failed = [o for o in outcomes if o.status is OutcomeStatus.FAILED]
    skipped = [o for o in outcomes if o.status is OutcomeStatus.SKIPPED]
    for outcome in skipped:
        print(f"skipped: {outcome.photo}: {outcome.detail}")
    for outcome in failed:
        print(f"FAILED:  {outcome.photo}: {outcome.detail}")
    mean = sum(o.seconds for o in done) / len(done) if done else 0.0
    print(f"{len(done)} done, {len(failed)} failed, {len(skipped)} skipped "
          f"({mean:.2f} s per photo); results in {out_dir.resolve()}")
    for outcome in done[:5]:
        print(f"  {outcome.photo.name} -> {out_dir.resolve() / outcome.stem}.*")
    return 1 if failed else 0


def model_is_available(args: argparse.Namespace) -> bool:
    """Point this process (and its workers) at --models-dir; False, with a message, if --model is
    not installed there."""
    from backend_server.models import store
    if args.models_dir is not None:
        os.environ[store.MODELS_ENV] = str(Path(args.models_dir).resolve())
    available = store.available_models()
    if args.model in available:
        return True
    how = store.KINDS[args.model].how_to_get if args.model in store.KINDS else ""
    print(f"facerecon: model {args.model!r} is not installed in {store.models_dir()}; available: "
          f"{', '.join(available)}. {how}", file=sys.stderr)
    return False


def run_evaluate(args: argparse.Namespace) -> int:
    from backend_server.pipeline.evaluate import landmark_error, photo_metrics, read_pts
    from backend_server.pipeline.reconstruct import Reconstructor
    if not model_is_available(args):
        return 2
    photos = gather_photos(args.inputs or [str(demo_photo())])
    device = args.device[0]
    reconstructor = Reconstructor(device)
    options = ReconstructOptions(texture_size=args.texture_size, subdivision=args.subdivision, model=args.model,
                                 lit_texture=True)           # the re-render is compared with the photo as lit
    rows, failures = [], 0
    print(f"{'photo':28s} {'PSNR dB':>8s} {'SSIM':>6s} {'seen':>5s} {'yaw':>6s} {'lm68 %IOD':>9s}")
    for photo in photos:
        try:
            result = reconstructor.run(photo.read_bytes(), photo.name, options)
        except (ProtocolError, OSError) as exc:
            print(f"{photo.name:28s} failed: {exc}")
            failures += 1
            continue
        face = result.faces[0]
        metrics = photo_metrics(result.photo.rgb, face.texture_vertices, result.model.topology, face.bake.texture,
                                face.fit.camera, device)
        row: dict[str, Any] = {"photo": str(photo), **metrics,
               "seen_fraction": face.bake.seen_fraction, **face.fit.pose.euler_degrees()}
        pts = photo.with_suffix(".pts")
        if pts.exists():
            predicted = result.model.ibug68(face.fit, face.landmarks) / result.photo.scale
            row.update(landmark_error(predicted, read_pts(pts)))
        rows.append(row)
        lm = f"{100 * row['landmark68_normalized']:8.2f}%" if "landmark68_normalized" in row else f"{'-':>9s}"
        print(f"{photo.name:28s} {row['psnr_db']:8.2f} {row['ssim']:6.3f} {row['seen_fraction']:5.2f} "
              f"{row['yaw']:6.1f} {lm}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failures else 0


def format_list(value: str) -> list[str]:
    """--format: comma-separated names of FORMATS, in any order."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'nothing'}: formats are {', '.join(FORMATS)} "
                                         "(comma-separated, e.g. obj,glb)")
    return list(dict.fromkeys(names))


def outputs_of(formats: list[str]) -> tuple[str, ...]:
    """The output kinds the formats write and the JSON, in the protocol's order (obj alone:
    DEFAULT_OUTPUTS)."""
    wanted = {kind for name in formats for kind in FORMATS[name]} | {"json"}
    return tuple(kind for kind in OUTPUT_KINDS if kind in wanted)


def face_choice(value: str) -> int:
    if value == "all":
        return -1
    if value.isdigit() and int(value) < 64:
        return int(value)
    raise argparse.ArgumentTypeError("--face takes a face index (0 = largest) or 'all'")


def texture_size(value: str) -> int:
    size = int(value)
    if size & (size - 1) or not limits.MIN_TEXTURE_SIZE <= size <= limits.MAX_TEXTURE_SIZE:
        raise argparse.ArgumentTypeError(f"a power of two from {limits.MIN_TEXTURE_SIZE} to {limits.MAX_TEXTURE_SIZE}")
    return size


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="builtin",
                        help="builtin (default), or an installed model: ict-facekit, sfm, ... "
                             "(facerecon-backend models install / list)")
    parser.add_argument("--models-dir", help="installed models (default $FACERECON_MODELS or "
                        "~/.cache/facerecon/models)")


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show MediaPipe's and TensorFlow Lite's own log lines (hidden by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facerecon", description="Single-photo 3D face reconstruction.")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("reconstruct", help="photos -> .obj/.mtl/.png/.json per face (also .glb, .usdc)")
    rec.add_argument("inputs", nargs="*", help="photos or folders (searched recursively)")
    rec.add_argument("--person", nargs="+", metavar="PHOTO",
                     help=f"1 to {limits.MAX_PERSON_PHOTOS} photos of one person: one head from all of them "
                          "(named after the first; posed as it)")
    rec.add_argument("--people", metavar="DIR",
                     help="a folder with a sub-folder of photos per person: one head per person, named after "
                          "its folder")
    rec.add_argument("-o", "--output", default="out", help="output folder (default: out)")
    rec.add_argument("--demo", action="store_true", help="also reconstruct matplotlib's sample portrait")
    rec.add_argument("--face", type=face_choice, default=0, help="face index, largest first, or 'all'")
    rec.add_argument("--texture-size", type=texture_size, default=limits.DEFAULT_TEXTURE_SIZE)
    rec.add_argument("--subdivision", type=int, choices=(0, 1, 2), default=1,
                     help="Loop subdivision levels of the mesh (default 1)")
    written = rec.add_mutually_exclusive_group()
    written.add_argument("--format", type=format_list, default=["obj"], metavar="obj,glb,usdc",
                         help="mesh formats, comma-separated (default obj): obj = .obj + .mtl + .png (and "
                         "_neutral.obj + _shape_keys.bin for models with expressions: what the Blender add-on "
                         "imports); glb = glTF 2.0 binary, textures and expressions (morph targets) inside; "
                         "usdc = USD with UsdPreviewSurface and UsdSkel blend shapes, beside the .png files it uses. "
                         "The .json comes with every format. Not with --uv-only")
    written.add_argument("--uv-only", action="store_true",
                         help="write only the texture (.png) and the JSON, no mesh (not with --format)")
    rec.add_argument("--lit-texture", action="store_true",
                     help="the photo as it shows the face: its light, hair and glasses kept, only unseen "
                          "texels completed (default: an albedo, light divided out, only skin sampled)")
    rec.add_argument("--device", type=parse_device, default=["cpu"],
                     help="cpu (default), or GPUs: 0,1 or cuda:0,cuda:1 (one GPU process each)")
    rec.add_argument("--workers", type=int, default=1,
                     help="worker processes on the CPU path (the GPU path uses every core)")
    rec.add_argument("--batch-size", type=int, default=16,
                     help="faces baked at once on each GPU (default 16)")
    rec.add_argument("--overwrite", action="store_true", help="redo photos whose results exist")
    rec.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_verbose_argument(rec)
    add_model_arguments(rec)
    rec.set_defaults(run=run_reconstruct)
    ev = commands.add_parser("evaluate", help="re-render into each photo: PSNR, SSIM, landmark error")
    ev.add_argument("inputs", nargs="*", help="photos or folders; a PHOTO.pts beside a photo is used as "
                    "ground-truth iBUG-68 landmarks (default: the demo photo)")
    ev.add_argument("--texture-size", type=texture_size, default=limits.DEFAULT_TEXTURE_SIZE)
    ev.add_argument("--subdivision", type=int, choices=(0, 1, 2), default=1)
    ev.add_argument("--json", help="also write the figures to this JSON file")
    ev.add_argument("--device", type=parse_device, default=["cpu"],
                    help="cpu (default) or one GPU (0 or cuda:0): bake and re-render there")
    add_model_arguments(ev)
    add_verbose_argument(ev)
    ev.set_defaults(run=run_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GLOG_minloglevel", "2")        # MediaPipe's native logging
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    from backend_server.cli.quiet import quiet_native_logs
    with quiet_native_logs(enabled=not args.verbose):
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
