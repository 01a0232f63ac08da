"""Commands for signed artifacts: keygen, sign."""

from __future__ import annotations

from ._common import HelpFormatter


def cmd_keygen(a) -> None:
    from ..signing import generate_keypair

    priv, pub = generate_keypair(a.out, overwrite=a.force)
    print(f"private key: {priv} (keep it off the screening box)\npublic key:  {pub} (give to --trusted-key)")


def cmd_sign(a) -> None:
    from ..signing import sign_artifact

    for art in a.artifacts:
        print(f"signed: {sign_artifact(art, a.key)}")


def register(sub) -> None:
    _add_keygen_parser(sub)
    _add_sign_parser(sub)


def _add_keygen_parser(sub) -> None:
    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts", formatter_class=HelpFormatter)
    kg.add_argument("out", help="path stem: writes STEM.key (private, 0600) and STEM.pub")
    kg.add_argument("--force", action="store_true", help="overwrite existing key files")
    kg.set_defaults(func=cmd_keygen)


def _add_sign_parser(sub) -> None:
    sg = sub.add_parser("sign", help="sign artifact manifests so --trusted-key services accept them",
                        formatter_class=HelpFormatter)
    sg.add_argument("artifacts", nargs="+", help="artifacts whose manifests to sign")
    sg.add_argument("--key", required=True, help="private key from cxr-edge keygen")
    sg.set_defaults(func=cmd_sign)
