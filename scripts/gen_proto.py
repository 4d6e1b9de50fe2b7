#!/usr/bin/env python3
"""Regenerate the Python stubs of the quotagate API from proto/ (and of the part of
Envoy's rate-limit API it serves, from third_party/envoy-rls/, into src/quotagate/envoy).

    python scripts/gen_proto.py           # write src/quotagate/v1/*_pb2{,_grpc}.py, *_pb2.pyi
    python scripts/gen_proto.py --check   # exit 1 and list the files that are stale

The protos are compiled with grpc_tools.protoc, with `proto/` and grpc_tools' bundled
well-known types on the include path, and `src/` as the output root. Because every proto
is named `quotagate/v1/x.proto` relative to `proto/`, the generated modules import each
other as `from quotagate.v1 import x_pb2`, which works wherever the `quotagate` package
is importable. Any bare `import x_pb2` (what protoc emits when a proto is compiled from
inside its own directory) is rewritten to that form as a safety net.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_ROOT = ROOT / "src"
#: (proto root, Python package of its files): every proto is `<package dir>/x.proto`
JOBS = ((ROOT / "proto", "quotagate.v1",
         '"""quotagate API stubs, generated; `make proto` regenerates (never edit)."""\n'),
        (ROOT / "third_party" / "envoy-rls", "quotagate.envoy",
         '"""Envoy\'s rate-limit API, the part quotagate serves (third_party/envoy-rls), '
         'generated; `make proto` regenerates (never edit)."""\n'))

#: Names of generated files in the package directory (what --check compares, and what a
#: regeneration may delete when its proto is gone).
GENERATED = re.compile(r".*_pb2(_grpc)?\.pyi?$")

_BARE_IMPORT = re.compile(r"^import (\w+_pb2(?:_grpc)?) as (\w+)$", re.MULTILINE)


def proto_files(root: Path, package: str) -> list[Path]:
    files = sorted((root / Path(*package.split("."))).glob("*.proto"))
    if not files:
        sys.exit(f"no .proto files under {root / Path(*package.split('.'))}")
    return files


def well_known_types() -> str:
    return str(importlib.resources.files("grpc_tools") / "_proto")


def run_protoc(out_root: Path, root: Path, package: str) -> None:
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known_types()}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        # Absolute paths: protoc maps them through the first -I to quotagate/v1/x.proto.
        *(str(p) for p in proto_files(root, package)),
    ]
    code = protoc.main(args)
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")


def fix_imports(pkg_dir: Path, package: str) -> None:
    """Make every import between generated modules absolute: `from quotagate.v1 import x`."""
    for path in sorted(pkg_dir.iterdir()):
        if not GENERATED.match(path.name):
            continue
        text = path.read_text(encoding="utf-8")
        fixed = _BARE_IMPORT.sub(rf"from {package} import \1 as \2", text)
        if fixed != text:
            path.write_text(fixed, encoding="utf-8")


def generate(out_root: Path, root: Path, package: str, init_text: str) -> Path:
    """Generate the package into out_root; return the package directory."""
    run_protoc(out_root, root, package)
    pkg_dir = out_root / Path(*package.split("."))
    fix_imports(pkg_dir, package)
    (pkg_dir / "__init__.py").write_text(init_text, encoding="utf-8")
    return pkg_dir


def managed(pkg_dir: Path) -> set[str]:
    if not pkg_dir.is_dir():
        return set()
    names = {p.name for p in pkg_dir.iterdir() if p.is_file() and GENERATED.match(p.name)}
    if (pkg_dir / "__init__.py").is_file():
        names.add("__init__.py")
    return names


def check() -> int:
    return max(check_one(*job) for job in JOBS)


def write() -> int:
    return max(write_one(*job) for job in JOBS)


def check_one(root: Path, package: str, init_text: str) -> int:
    committed = OUT_ROOT / Path(*package.split("."))
    with tempfile.TemporaryDirectory(prefix="quotagate-proto-") as tmp:
        fresh = generate(Path(tmp), root, package, init_text)
        want, have = managed(fresh), managed(committed)
        stale = sorted(
            name for name in want & have
            if not filecmp.cmp(fresh / name, committed / name, shallow=False)
        )
        missing = sorted(want - have)
        extra = sorted(have - want)
    if not (stale or missing or extra):
        print(f"{committed.relative_to(ROOT)}: up to date")
        return 0
    rel = committed.relative_to(ROOT)
    for name in stale:
        print(f"stale:   {rel / name}")
    for name in missing:
        print(f"missing: {rel / name}")
    for name in extra:
        print(f"extra:   {rel / name} (no proto generates it)")
    print("run `make proto` (python scripts/gen_proto.py) to regenerate", file=sys.stderr)
    return 1


def write_one(root: Path, package: str, init_text: str) -> int:
    target = OUT_ROOT / Path(*package.split("."))
    with tempfile.TemporaryDirectory(prefix="quotagate-proto-") as tmp:
        fresh = generate(Path(tmp), root, package, init_text)
        want = managed(fresh)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(managed(target) - want):
            (target / name).unlink()
            print(f"removed {target.relative_to(ROOT) / name}")
        for name in sorted(want):
            shutil.copyfile(fresh / name, target / name)
    print(f"generated {len(want)} files in {target.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true",
        help="generate into a temporary directory and exit 1 if src/ differs",
    )
    args = parser.parse_args(argv)
    return check() if args.check else write()


if __name__ == "__main__":
    sys.exit(main())
