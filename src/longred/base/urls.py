"""One rule for every path the project writes or reads: a plain path, ``file://``, or an fsspec URL.

Caches are fsspec stores, so they take any URL whose backend is installed (``s3://`` through the ``s3``
extra, ``gs://`` through ``gcs``, ``memory://`` inside one process). Run folders and eval reports are
written with local tools (``save_pretrained``, ``torch.save``, matplotlib), so they must be local.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXTRAS", "check_urls", "local_folder", "store_url"]

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}
"""URL scheme -> the longred extra that installs its fsspec backend."""


def _scheme(url: str) -> str | None:
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isidentifier() else None


def local_folder(url: str, *, what: str) -> Path:
    """A local path for ``url`` (a path or ``file://``); any other scheme is refused by name."""
    text = str(url)
    scheme = _scheme(text)
    if scheme is None:
        return Path(text).expanduser()
    if scheme == "file":
        return Path(text[len("file://") :])
    raise ValueError(
        f"{what} {text!r}: {scheme}:// is not supported here; it is written with local tools "
        "(a path or file://). Write it locally and copy it."
    )


def store_url(url: str, *, what: str) -> str:
    """``url`` ready for fsspec/zarr: ``file://`` becomes a path; a remote scheme needs its backend.

    Raises:
        ValueError: an unknown scheme, or a known one whose backend is not installed (naming the extra).
    """
    text = str(url)
    scheme = _scheme(text)
    if scheme is None:
        return text
    if scheme == "file":
        return text[len("file://") :]
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError as err:
        raise ValueError(f"{what} {text!r}: unknown URL scheme {scheme}://.") from err
    except ImportError as err:
        extra = EXTRAS.get(scheme)
        install = (
            f"pip install 'longred[{extra}]'" if extra else f"install the fsspec backend for {scheme}://"
        )
        raise ValueError(f"{what} {text!r}: the {scheme}:// backend is not installed; {install}.") from err
    return text


def check_urls(config: object, *, stores: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> list[str]:
    """Normalise ``config``'s URL fields in place (stores: `store_url`, folders: `local_folder`); return a
    problem per field that is refused, for the config's one error listing."""
    problems = []
    for name, normalise in [*((n, store_url) for n in stores), *((n, local_folder) for n in folders)]:
        value = getattr(config, name)
        if value is None:
            continue
        try:
            setattr(config, name, str(normalise(value, what=name)))
        except ValueError as err:
            problems.append(str(err))
    return problems
