"""GPU health behind one probe interface, and a classifier of error text into launcher verdicts.

Verdicts map to exit codes: ``RESTART_HERE`` -> 75, ``REPLACE_NODE`` -> 77,
``DO_NOT_REQUEUE`` -> 78 (see :mod:`exitcodes`). XID meanings follow NVIDIA's "XID Errors"
catalogue (docs.nvidia.com/deploy/xid-errors) and its "Dynamic Page Retirement" / "Row Remapping"
notes; where NVIDIA says "reset the GPU" we say REPLACE_NODE, because a job cannot reset a GPU it
is using and the scheduler must drain the node.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from streamshard.errors import StreamshardError, missing_dependency
from streamshard.recovery import exitcodes

_logger = logging.getLogger(__name__)

RESTART_HERE = "restart-here"
REPLACE_NODE = "replace-node"
DO_NOT_REQUEUE = "do-not-requeue"
EXIT_CODES = {RESTART_HERE: exitcodes.RESTART_HERE, REPLACE_NODE: exitcodes.REPLACE_NODE,
              DO_NOT_REQUEUE: exitcodes.DO_NOT_REQUEUE}

# XID -> (verdict, reason). Unknown XIDs: RESTART_HERE by default (``UNKNOWN_XID``): NVIDIA's
# catalogue has ~150 codes, most of them application-caused; draining a node on every new code would
# empty a 1,000-GPU cluster's spare pool on driver updates. Where NVML gives a recommended recovery
# action for the device (``NvmlProbe``), that action decides instead of this table.
XID_TABLE: dict[int, tuple[str, str]] = {
    13: (RESTART_HERE, "graphics engine exception: usually an application error (bad index, illegal instruction)"),
    31: (RESTART_HERE, "GPU memory page fault: usually an application illegal address"),
    43: (RESTART_HERE, "GPU stopped processing: user application fault, GPU keeps working"),
    45: (RESTART_HERE, "preemptive cleanup after a previous error (process killed); follows another XID"),
    48: (REPLACE_NODE, "double-bit ECC error (DBE): uncorrectable memory error, GPU reset needed"),
    61: (REPLACE_NODE, "internal micro-controller breakpoint/warning: GPU reset needed"),
    62: (REPLACE_NODE, "internal micro-controller halt: GPU reset needed"),
    63: (REPLACE_NODE, "ECC page retirement / row remapping recorded: a GPU reset applies it"),
    64: (REPLACE_NODE, "ECC page retirement / row remapper recording failure"),
    69: (RESTART_HERE, "graphics engine class error: usually an application error"),
    74: (REPLACE_NODE, "NVLink error: link degraded or down"),
    79: (REPLACE_NODE, "GPU has fallen off the bus"),
    92: (REPLACE_NODE, "high single-bit ECC error rate: memory degrading"),
    94: (RESTART_HERE, "contained ECC error: only the application that hit it is affected; restart it"),
    95: (REPLACE_NODE, "uncontained ECC error: every application on the GPU affected, GPU reset needed"),
    109: (RESTART_HERE, "context switch timeout: usually an application hang"),
    119: (REPLACE_NODE, "GSP RPC timeout: firmware unresponsive, GPU reset needed"),
    120: (REPLACE_NODE, "GSP error: firmware fault, GPU reset needed"),
    140: (REPLACE_NODE, "unrecovered ECC error"),
}

# Message patterns, first match wins (ordered from specific to generic).
MESSAGE_RULES: tuple[tuple[re.Pattern, str, str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), v, r) for p, v, r in (
        (r"uncorrectable ECC error", REPLACE_NODE, "CUDA reports an uncorrectable ECC error"),
        (r"fallen off the bus|GPU is lost", REPLACE_NODE, "GPU lost from the PCIe bus"),
        (r"no CUDA-capable device|CUDA driver version is insufficient|cudaErrorDevicesUnavailable"
         r"|CUDA error: unknown error", REPLACE_NODE, "driver or device unusable on this node"),
        (r"NVLink|nvlink", REPLACE_NODE, "NVLink failure"),
        (r"the launch timed out and was terminated|cudaErrorLaunchTimeout|CUDA_ERROR_LAUNCH_TIMEOUT", RESTART_HERE,
         "CUDA launch timeout: a kernel ran past the watchdog (display GPU or a hung kernel); restart"),
        (r"Out of memory: Killed process|oom-kill|oom_reaper|Memory cgroup out of memory", DO_NOT_REQUEUE,
         "host out of memory (kernel OOM killer): deterministic for this config, fix memory use"),
        (r"device-side assert", DO_NOT_REQUEUE, "device-side assert: a bug, restarting repeats it"),
        (r"CUDA out of memory|OutOfMemoryError", DO_NOT_REQUEUE, "out of memory: deterministic, fix the config"),
        (r"ncclInvalidUsage|ncclInvalidArgument", DO_NOT_REQUEUE, "NCCL invalid usage: a bug"),
        (r"illegal memory access|unspecified launch failure|misaligned address", RESTART_HERE,
         "CUDA kernel fault: most often software; restart (XIDs tell if it is hardware)"),
        (r"Watchdog caught collective operation timeout|collective operation timeout", RESTART_HERE,
         "collective timeout: a peer hung or died"),
        (r"Heartbeat monitor timed out|ProcessGroupNCCL's watchdog got stuck|heartbeat timeout", RESTART_HERE,
         "NCCL heartbeat monitor timeout: the NCCL watchdog itself hung (a stuck CUDA call)"),
        (r"IBV_WC_LOC_|Local protection error|ibv_open_device failed|mlx5\S*: .*(fatal|catastrophic)",
         REPLACE_NODE, "InfiniBand/RDMA error on the local HCA or link"),
        (r"NET/IB|IBV_WC_|transport retry counter exceeded|RDMA", RESTART_HERE,
         "RDMA transfer error: usually the remote side failed; restart (local HCA faults drain instead)"),
        (r"gloo.*(Timed out|Connection closed by peer|Connection reset)|Gloo connectFullMesh failed",
         RESTART_HERE, "gloo peer failure or timeout: a peer died or hung"),
        (r"ncclRemoteError|remote process exited|Connection reset by peer|Connection closed by peer",
         RESTART_HERE, "a peer failed; this node is fine"),
        (r"ncclSystemError|ncclInternalError|ncclUnhandledCudaError|NCCL error|NCCL communicator was aborted",
         RESTART_HERE, "NCCL runtime error"),
    )
)

XID_LINE = re.compile(r"NVRM: Xid \((?P<pci>[^)]*)\): (?P<xid>\d+),\s*(?P<rest>.*)")


@dataclass(frozen=True)
class Classification:
    verdict: str
    reason: str
    xid: int | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


UNKNOWN_XID = RESTART_HERE


def classify_xid(xid: int, unknown: str = UNKNOWN_XID) -> Classification:
    """Verdict for an XID; ``unknown`` (default restart-here) for codes not in ``XID_TABLE``."""
    if unknown not in EXIT_CODES:
        raise ValueError(f"unknown must be one of {sorted(EXIT_CODES)}, got {unknown!r}")
    verdict, reason = XID_TABLE.get(xid, (unknown, f"XID not in our table: {unknown} (journaled for review)"))
    return Classification(verdict, f"XID {xid}: {reason}", xid)


# NVML's recommended recovery action (``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``, driver R550+):
# 0 none, 1 GPU reset, 2 node reboot, 3 drain peer-to-peer, 4 drain and reset. A job cannot reset
# or reboot what it runs on, so every action but "none" means: leave this node.
NVML_RECOVERY_ACTIONS = {1: "GPU reset", 2: "node reboot", 3: "drain P2P", 4: "drain and reset"}


def classify_message(text: str) -> Classification | None:
    """Classify a CUDA/NCCL/driver error message or kernel log line; None if it is not one we know."""
    m = XID_LINE.search(text)
    if m:
        return classify_xid(int(m["xid"]))
    for pattern, verdict, reason in MESSAGE_RULES:
        if pattern.search(text):
            return Classification(verdict, reason)
    return None


@dataclass(frozen=True)
class HealthEvent:
    """One observation from a probe. ``fatal`` events end the run with ``classification.exit_code``;
    others (throttling, corrected ECC) are journaled only."""

    source: str  # "nvml", "kernel-log", "fake"
    kind: str  # "xid", "ecc", "throttle", "error"
    device: str
    detail: str
    classification: Classification | None = None

    @property
    def fatal(self) -> bool:
        return self.classification is not None


class HealthProbe(Protocol):
    """Something that can be polled for new health events.

    ``poll()`` returns only events not returned before, never blocks for long (<= 10 ms), and is
    called from the training thread between steps (need not be thread-safe). ``close()`` releases
    handles. Probes are not picklable (they hold driver handles or file positions).
    """

    def poll(self) -> list[HealthEvent]: ...

    def close(self) -> None: ...


class FakeProbe:
    """Scripted probe for tests and fault injection: ``inject`` an event, the next ``poll`` returns it."""

    def __init__(self, events: Iterable[HealthEvent] = ()):
        self._pending = list(events)

    def inject(self, event: HealthEvent) -> None:
        self._pending.append(event)

    def inject_xid(self, xid: int, device: str = "PCI:0000:00:00") -> None:
        self.inject(HealthEvent("fake", "xid", device, f"injected XID {xid}", classify_xid(xid)))

    def poll(self) -> list[HealthEvent]:
        out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        self._pending = []


def parse_xid_line(line: str) -> HealthEvent | None:
    """Parse ``... NVRM: Xid (PCI:0000:3b:00): 79, pid=..., GPU has fallen off the bus.``"""
    m = XID_LINE.search(line)
    if m is None:
        return None
    xid = int(m["xid"])
    return HealthEvent("kernel-log", "xid", m["pci"], m["rest"].strip(), classify_xid(xid))


def tail_file(path: str) -> Callable[[], list[str]]:
    """Line source over a growing text file (``/var/log/kern.log``): each call returns the complete
    lines appended since the previous call; starts at the current end (old XIDs are history)."""
    state = {"pos": os.path.getsize(path) if os.path.exists(path) else 0, "partial": ""}

    def read() -> list[str]:
        try:
            with open(path, errors="replace") as f:
                f.seek(state["pos"])
                chunk = f.read(1 << 20)
                state["pos"] = f.tell()
        except FileNotFoundError:
            return []
        text = state["partial"] + chunk
        lines = text.split("\n")
        state["partial"] = lines.pop()
        return lines

    return read


class KernelLogXidProbe:
    """XIDs from kernel log text (dmesg, ``journalctl -k``, kern.log) given by a line source."""

    def __init__(self, lines: Callable[[], Iterable[str]]):
        self._lines = lines

    def poll(self) -> list[HealthEvent]:
        return [e for e in map(parse_xid_line, self._lines()) if e is not None]

    def close(self) -> None:
        pass


class NvmlProbe:
    """NVML (``pip install 'streamshard[nvml]'``): XID critical-error events, uncorrected ECC
    counters and hardware throttle reasons. Raises StreamshardError if NVML cannot initialise
    (no driver, no GPU); MissingDependencyError if nvidia-ml-py is missing."""

    def __init__(self, nvml=None):
        """``nvml`` is the ``pynvml`` module (default: imported here); tests pass a stand-in with
        the same functions, since NVML cannot run on a host without an NVIDIA driver."""
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                raise missing_dependency("nvidia-ml-py", "nvml", "NvmlProbe") from None
        self._nv = pynvml = nvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise StreamshardError(f"NVML is not available on this host ({e}); no GPU health probing") from None
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self._events = pynvml.nvmlEventSetCreate()
        for h in self._handles:
            try:
                pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, self._events)
            except pynvml.NVMLError:  # not supported on this GPU: ECC/throttle still polled
                pass
        self._ecc = [self._uncorrected(h) for h in self._handles]
        self._action = [0 for _ in self._handles]
        self._throttled = [0 for _ in self._handles]

    def _uncorrected(self, h) -> int:
        nv = self._nv
        try:
            return nv.nvmlDeviceGetTotalEccErrors(h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
        except nv.NVMLError:  # ECC disabled or unsupported
            return 0

    def poll(self) -> list[HealthEvent]:
        nv, out = self._nv, []
        for _ in range(64):  # drain queued XID events, bounded
            try:
                ev = nv.nvmlEventSetWait(self._events, 0)
            except nv.NVMLError:  # NVML_ERROR_TIMEOUT: queue empty
                break
            xid, i = int(ev.eventData), self._index(ev.device)
            c = classify_xid(xid)
            action = self._recovery_action(self._handles[i]) if 0 <= i < len(self._handles) else 0
            if action:  # NVML's recommendation for this device decides over our table
                c = Classification(REPLACE_NODE, f"XID {xid}: NVML recommends {NVML_RECOVERY_ACTIONS[action]}", xid)
                self._action[i] = action
            out.append(HealthEvent("nvml", "xid", f"gpu{i}", f"XID {xid}", c))
        slow_bits = nv.nvmlClocksThrottleReasonHwSlowdown | nv.nvmlClocksThrottleReasonHwThermalSlowdown \
            | nv.nvmlClocksThrottleReasonHwPowerBrakeSlowdown
        for i, h in enumerate(self._handles):
            action = self._recovery_action(h)
            if action and action != self._action[i]:
                out.append(HealthEvent("nvml", "recovery-action", f"gpu{i}", f"NVML recovery action {action}",
                                       Classification(REPLACE_NODE,
                                                      f"NVML recommends {NVML_RECOVERY_ACTIONS[action]}")))
            self._action[i] = action
            ecc = self._uncorrected(h)
            if ecc > self._ecc[i]:
                out.append(HealthEvent("nvml", "ecc", f"gpu{i}", f"uncorrected ECC errors {self._ecc[i]} -> {ecc}",
                                       Classification(REPLACE_NODE, "uncorrected volatile ECC errors increased")))
                self._ecc[i] = ecc
            try:
                reasons = nv.nvmlDeviceGetCurrentClocksThrottleReasons(h) & slow_bits
            except nv.NVMLError:
                reasons = 0
            if reasons and reasons != self._throttled[i]:
                out.append(HealthEvent("nvml", "throttle", f"gpu{i}", f"hardware slowdown reasons 0x{reasons:x}"))
            self._throttled[i] = reasons
        return out

    def _recovery_action(self, h) -> int:
        """NVML's recommended recovery action (0 none); 0 where the driver or binding lacks the field."""
        nv = self._nv
        field = getattr(nv, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
        if field is None:
            return 0
        try:
            (value,) = nv.nvmlDeviceGetFieldValues(h, [field])
        except nv.NVMLError:
            return 0
        if getattr(value, "nvmlReturn", 0) != 0:
            return 0
        action = int(value.value.uiVal)
        return action if action in NVML_RECOVERY_ACTIONS else 0

    def _index(self, device) -> int:
        try:
            return self._nv.nvmlDeviceGetIndex(device)
        except self._nv.NVMLError:
            return -1

    def close(self) -> None:
        try:
            self._nv.nvmlEventSetFree(self._events)
        finally:
            self._nv.nvmlShutdown()


def available_probes(kernel_log: str | None = None, *,
                     log: Callable[[str], None] | None = None) -> list[HealthProbe]:
    """NVML if it works here, plus a kernel-log probe when ``kernel_log`` names a readable file.
    Reasons for a missing probe go to ``log`` (default: this module's logger, level INFO)."""
    log = log if log is not None else _logger.info
    probes: list[HealthProbe] = []
    try:
        probes.append(NvmlProbe())
    except StreamshardError as e:
        log(f"NVML probe disabled: {e}")
    if kernel_log and os.access(kernel_log, os.R_OK):
        probes.append(KernelLogXidProbe(tail_file(kernel_log)))
    return probes
