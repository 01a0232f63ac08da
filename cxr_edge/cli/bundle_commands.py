"""``cxr-edge bundle``: make, check or archive the one folder (or file) a screening box is given."""

from __future__ import annotations

from pathlib import Path

from ._common import HelpFormatter


def cmd_bundle(a) -> None:
    from .. import bundle
    from ..errors import ConfigError

    src = Path(a.path)
    folder = bundle.bundle_of(src)
    if a.check:
        if folder is None:
            raise ConfigError(f"{src} is not a bundle (no {bundle.INDEX}); make one with cxr-edge bundle ARTIFACT.")
        model = bundle.check_bundle(folder)
        print(f"{folder}: complete and unchanged; model {model.name}\n{bundle.describe(folder)}")
        return
    if folder is None or a.out:
        if folder is not None:
            model = bundle.check_bundle(folder)  # a bundle copied to another folder (--out)
        elif src.is_file():
            model = src
        else:
            raise ConfigError(f"{src} is neither an artifact file nor a bundle; give the model file from cxr-edge export.")
        folder = bundle.make_bundle(model, a.out, replace=a.force)
        print(f"bundle: {folder}\n{bundle.describe(folder)}")
    else:
        bundle.check_bundle(folder)
        print(f"bundle: {folder} (already a bundle, checked)")
    if a.archive:
        out = Path(a.archive)
        if out.exists() and not a.force:
            raise ConfigError(f"{out} exists; choose another name or pass --force to replace it.")
        print(f"archive: {bundle.write_archive(folder, out)} (one file: every command accepts it as the artifact)")


def register(sub) -> None:
    _add_bundle_parser(sub)


def _add_bundle_parser(sub) -> None:
    bd = sub.add_parser("bundle", help="one folder (or .cxrbundle.tar file) with everything a screening box needs",
                        formatter_class=HelpFormatter,
                        description="Copies an artifact with its manifest, Grad-CAM head, signature, earlier manifest "
                                    "versions and calibration reports into one folder with an index (bundle.json) that "
                                    "every command checks on load; optionally one archive file of it. export and build "
                                    "write bundles already (OUT/bundles/); use this after signing or to make the archive.")
    bd.add_argument("path", help="an artifact (model file with its manifest), or a bundle folder or archive")
    bd.add_argument("--out", help="bundle folder to write (default: ARTIFACT_FOLDER/bundles/MODEL_FILE)")
    bd.add_argument("--archive", metavar="FILE.cxrbundle.tar", help="also write the bundle as this one file")
    bd.add_argument("--check", action="store_true", help="only check a bundle is complete and unchanged")
    bd.add_argument("--force", action="store_true", help="replace an existing bundle of the same model, or archive")
    bd.set_defaults(func=cmd_bundle)
