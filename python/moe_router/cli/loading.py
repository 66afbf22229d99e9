"""Input files of the command line: one loader for logits and hidden states.

:class:`InputFile` checks a path, lists an .npz file's arrays from their
headers, chooses an array by key and reads it with the checks and messages
every command shares. :func:`load_logits` (FILE and ``--key``, or the embedded
sample) and :func:`load_hidden` (``route --hidden``) are built on it.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._inputs import BIAS_KINDS, HIDDEN_KINDS, LOGITS_KINDS, WEIGHT_KINDS, kinds_text
from ..router import compute_dtype
from ..data import DEFAULT_LOGITS_FILE, default_logits
from .errors import CliError
from .parsing import DEFAULT_HIDDEN_KEY

#: Errors that mean a file could not be read.
READ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError)
#: Options of the hidden-state path (attribute, flag).
HIDDEN_OPTIONS = (("weight_key", "--weight-key"), ("bias_key", "--bias-key"),
                  ("hidden_key", "--hidden-key"), ("router_dtype", "--router-dtype"))

Members = Dict[str, Tuple[Tuple[int, ...], np.dtype]]


def npz_members(path: Path) -> Members:
    """Shape and dtype of each array in an .npz, read from the headers only."""
    members: Members = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            members[name[:-4]] = (tuple(shape), dtype)
    return members


def _describe(shape: Tuple[int, ...], dtype: np.dtype) -> str:
    return f"{list(shape)} {dtype}"


class InputFile:
    """An .npy or .npz file named on the command line.

    Parameters
    ----------
    file : str
        The path as the user gave it (messages quote it).
    suffixes : sequence of str
        Accepted suffixes, lower case (``".npy"``, ``".npz"``).
    not_a_file, wrong_suffix : str
        Messages for a directory and for another suffix (``{file}`` and
        ``{suffix}`` are filled in).

    Raises
    ------
    CliError
        Missing file, directory, other suffix, or an .npz whose listing cannot be read.
    """

    def __init__(self, file: str, suffixes: Sequence[str], not_a_file: str, wrong_suffix: str) -> None:
        self.file = file
        self.path = Path(file)
        if not self.path.exists():
            raise CliError(f"no such file: {file}")
        suffix = self.path.suffix.lower()
        if self.path.is_dir():
            raise CliError(not_a_file.format(file=file, suffix=self.path.suffix or "(none)"))
        if suffix not in suffixes:
            raise CliError(wrong_suffix.format(file=file, suffix=self.path.suffix or "(none)"))
        self.is_npz = suffix == ".npz"
        self.members: Members = {}
        if self.is_npz:
            try:
                self.members = npz_members(self.path)
            except READ_ERRORS as exc:
                raise CliError(f"cannot read {file}: {exc}") from None

    def listing(self, keys: Optional[Sequence[str]] = None) -> str:
        """``key [shape] dtype`` of the given arrays (default: all), comma separated."""
        names = self.members if keys is None else keys
        return ", ".join(f"{k} {_describe(*self.members[k])}" for k in names)

    def read(self, key: Optional[str], option: Optional[str], kinds: str, what: str) -> np.ndarray:
        """The array ``key`` of an .npz (None: the array of an .npy), checked to be of dtype ``kinds``.

        ``kinds`` are the NumPy dtype kinds the API accepts for that argument
        (``moe_router._inputs.LOGITS_KINDS``, ...), so a file is refused exactly
        when the array would be. ``option`` is the flag that chose the key:
        messages then start with ``"{option} {key}: "``; None for the logits of
        FILE/``--key``. ``what`` names the array in the message for another dtype.
        """
        prefix = self._prefix(key, option)
        if key is not None and key not in self.members:
            raise CliError(f"{prefix}{self.file} has no array {key!r}; its keys are: {self.listing()}")
        label = self.file if option is None else self.label(key)
        try:
            if key is None:
                array = np.load(self.path, allow_pickle=False)
            else:
                with np.load(self.path, allow_pickle=False) as z:
                    array = z[key]
        except READ_ERRORS as exc:
            raise CliError(f"cannot read {label}: {exc}") from None
        if array.dtype.kind not in kinds:
            raise CliError(f"{prefix}{self.label(key)} has dtype {array.dtype}; {what} must be "
                           f"{kinds_text(kinds)}")
        return array

    def label(self, key: Optional[str]) -> str:
        """``file[key]``, or ``file`` for an .npy."""
        return self.file if key is None else f"{self.file}[{key}]"

    def check_shape(self, array: np.ndarray, key: Optional[str], option: Optional[str], ok: bool,
                    expected: str) -> None:
        """Raise ``CliError`` unless ``ok``: ``[option key: ]file[key] has shape [...]; expected ...``."""
        if not ok:
            raise CliError(f"{self._prefix(key, option)}{self.label(key)} has shape {list(array.shape)}; "
                           f"expected {expected}")

    @staticmethod
    def _prefix(key: Optional[str], option: Optional[str]) -> str:
        return "" if option is None else f"{option} {key}: "


def _source(kind: str, file: str, key: Optional[str], array: np.ndarray, label: str) -> Dict[str, Any]:
    return {"kind": kind, "path": str(file), "key": key, "shape": list(array.shape),
            "dtype": str(array.dtype), "label": label}


# --------------------------------------------------------------------------- logits


def _logits_key(src: InputFile, key: Optional[str]) -> Optional[str]:
    """The logits' key in ``src``: ``key``, or the one 2-D/3-D float array of an .npz
    (failing any float array, the one 2-D/3-D integer array)."""
    if not src.is_npz:
        if key is not None:
            raise CliError(f"--key applies to .npz files; {src.file} is an .npy file")
        return None
    if not src.members:
        raise CliError(f"{src.file} holds no arrays")
    if key is not None:
        return key
    # Float arrays first; an integer array is chosen only where no float array is there.
    candidates: List[str] = []
    for kinds, kind_name in (("f", "float"), ("iu", "integer")):
        candidates = [k for k, (s, d) in src.members.items() if len(s) in (2, 3) and d.kind in kinds]
        if candidates:
            break
    if len(candidates) != 1:
        what = f"several 2-D/3-D {kind_name} arrays" if candidates else "no 2-D/3-D float or integer array"
        raise CliError(f"{src.file} holds {what}; choose one with --key NAME: "
                       f"{src.listing(candidates or None)}")
    return candidates[0]


def load_array(file: str, key: Optional[str]) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Read logits from an .npy or .npz file; returns the array and a description of its source.

    Raises
    ------
    CliError
        Missing or unreadable file, unknown suffix, missing or ambiguous ``key``,
        or an array that is not a 2-D/3-D array of floats or integers (integers
        are converted to float64 by ``route_logits``, as in the API).
    """
    src = InputFile(file, (".npy", ".npz"), "{file} is a directory, expected an .npy or .npz file",
                    "{file}: unsupported file type {suffix!r}; expected .npy or .npz")
    key = _logits_key(src, key)
    array = src.read(key, None, LOGITS_KINDS, "router logits")
    label = src.label(key)
    src.check_shape(array, key, None, array.ndim in (2, 3), "logits [T, E] or [B, S, E]")
    return array, _source("file", file, key, array, label)


def load_default() -> Tuple[np.ndarray, Dict[str, Any]]:
    """The embedded default logits and a description of them."""
    logits, meta = default_logits()
    label = f"embedded {DEFAULT_LOGITS_FILE} ({meta.get('model', '?')}, layer {meta.get('layer', '?')})"
    source = _source("embedded", DEFAULT_LOGITS_FILE, None, logits, label)
    source["meta"] = meta
    return logits, source


def load_logits(args: argparse.Namespace) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The logits a routing command works on (FILE, or the embedded default)."""
    if args.file is None:
        if args.key is not None:
            raise CliError("--key needs a FILE")
        return load_default()
    return load_array(args.file, args.key)


# --------------------------------------------------------------------------- hidden states


def hidden_options_given(args: argparse.Namespace) -> List[str]:
    """The hidden-state options present in ``args`` (flags, in a fixed order)."""
    return [flag for attr, flag in HIDDEN_OPTIONS if getattr(args, attr, None) is not None]


def effective_router_dtype(hidden: np.ndarray, router_dtype: Optional[str]) -> str:
    """The dtype ``ExpertRouter`` computes the GEMM in (:func:`moe_router.router.compute_dtype`)."""
    forced = compute_dtype(hidden, router_dtype)
    return str(forced) if forced is not None else ("float32" if hidden.dtype == np.float32 else "float64")


def load_hidden(args: argparse.Namespace) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray],
                                                   Dict[str, Any], Dict[str, Any]]:
    """Hidden states, router weight and bias of ``route --hidden``; plus the source and
    router descriptions of the report.

    Raises
    ------
    CliError
        FILE or ``--key`` given as well, no ``--weight-key``, a file that is not a
        readable .npz, a missing key, or arrays whose shapes do not fit together.
    """
    file = args.hidden
    if args.file is not None:
        raise CliError(f"give either FILE ({args.file}) or --hidden {file}, not both")
    if args.key is not None:
        raise CliError("--key selects logits in FILE; with --hidden, choose the arrays with "
                       "--hidden-key, --weight-key and --bias-key")
    if args.weight_key is None:
        raise CliError("--hidden needs --weight-key NAME (the router weight [D, E] in the same file)")
    wrong = "--hidden {file}: expected an .npz file holding the hidden states and the router weight"
    src = InputFile(file, (".npz",), wrong, wrong)
    hidden_key = DEFAULT_HIDDEN_KEY if args.hidden_key is None else args.hidden_key
    hidden = src.read(hidden_key, "--hidden-key", HIDDEN_KINDS, "hidden states")
    src.check_shape(hidden, hidden_key, "--hidden-key", hidden.ndim in (2, 3), "hidden states [T, D] or [B, S, D]")
    dim = int(hidden.shape[-1])

    wkey = args.weight_key
    weight = src.read(wkey, "--weight-key", WEIGHT_KINDS, "a router weight")
    src.check_shape(weight, wkey, "--weight-key", weight.ndim == 2 and weight.shape[0] == dim,
                    f"[D, E] with D = {dim} (the hidden size of {hidden_key} {list(hidden.shape)})")
    experts = int(weight.shape[1])

    bias = None
    if args.bias_key is not None:
        bkey = args.bias_key
        bias = src.read(bkey, "--bias-key", BIAS_KINDS, "a router bias")
        src.check_shape(bias, bkey, "--bias-key", bias.shape == (experts,),
                        f"[{experts}] (E of {wkey} {list(weight.shape)})")

    label = f"{file}[{hidden_key}] @ {wkey}" + ("" if bias is None else f" + {args.bias_key}")
    router = {"kind": "linear", "input_dim": dim, "num_experts": experts,
              "dtype": effective_router_dtype(hidden, args.router_dtype),
              "router_dtype": args.router_dtype, "weight_key": wkey, "bias_key": args.bias_key,
              "hidden_key": hidden_key}
    return hidden, weight, bias, _source("hidden", file, hidden_key, hidden, label), router
