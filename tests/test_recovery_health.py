"""XID parsing, error classification, probes, exit codes and the fault-plan grammar."""

from __future__ import annotations

import pytest

from streamshard.errors import ConfigError, MissingDependencyError, StreamshardError
from streamshard.recovery import exitcodes
from streamshard.recovery.faultplan import Fault, fault_plan_from_env, parse_fault_plan
from streamshard.recovery.health import (
    DO_NOT_REQUEUE, REPLACE_NODE, RESTART_HERE, XID_TABLE, FakeProbe, KernelLogXidProbe, NvmlProbe,
    available_probes, classify_message, classify_xid, parse_xid_line, tail_file,
)

# (kernel log line, expected XID, expected device, expected verdict)
XID_LINES = [
    # dmesg format with a timestamp: fallen off the bus -> replace the node
    ("[ 4512.337188] NVRM: Xid (PCI:0000:3b:00): 79, pid=2214, name=python, GPU has fallen off the bus.",
     79, "PCI:0000:3b:00", REPLACE_NODE),
    # journalctl -k format with host and kernel prefix: double-bit ECC
    ("Nov 25 09:12:01 node7 kernel: NVRM: Xid (PCI:0000:86:00): 48, pid='<unknown>', name=<unknown>, "
     "An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 6.",
     48, "PCI:0000:86:00", REPLACE_NODE),
    # contained ECC error (Ampere+): only the hitting application dies, restart here
    ("NVRM: Xid (PCI:0000:07:00): 94, pid=91, name=python, Contained: SM (0x1).", 94, "PCI:0000:07:00", RESTART_HERE),
    # uncontained ECC error: GPU reset needed
    ("NVRM: Xid (PCI:0000:07:00): 95, pid=91, Uncontained: FBHUB.", 95, "PCI:0000:07:00", REPLACE_NODE),
    # application page fault: software
    ("NVRM: Xid (PCI:0000:3b:00): 31, pid=1, name=python, Ch 00000010, intr 10000000.", 31, "PCI:0000:3b:00",
     RESTART_HERE),
    # NVLink error
    ("NVRM: Xid (PCI:0000:3b:00): 74, pid=1, NVLink: fatal error detected on link 4", 74, "PCI:0000:3b:00",
     REPLACE_NODE),
    # row remapping event
    ("NVRM: Xid (PCI:0000:3b:00): 63, pid=1, Row Remapper: New row marked for remapping", 63, "PCI:0000:3b:00",
     REPLACE_NODE),
    # an XID not in our table: journaled, restart in place (does not drain the node by default)
    ("NVRM: Xid (PCI:0000:3b:00): 999, something new", 999, "PCI:0000:3b:00", RESTART_HERE),
]


@pytest.mark.parametrize("line, xid, device, verdict", XID_LINES, ids=[str(r[1]) for r in XID_LINES])
def test_parse_xid_line(line, xid, device, verdict):
    event = parse_xid_line(line)
    assert event.kind == "xid" and event.device == device and event.fatal
    assert event.classification.xid == xid and event.classification.verdict == verdict
    assert classify_message(line).verdict == verdict  # the same line through the message classifier


@pytest.mark.parametrize("line", [
    "NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15",  # not an XID
    "NVRM: Xid (PCI:0000:3b:00): notanumber, ...",  # malformed code
    "",
])
def test_non_xid_lines_are_ignored(line):
    assert parse_xid_line(line) is None


def test_xid_table_covers_the_usual_suspects():
    for xid in (48, 63, 64, 74, 79, 92, 94, 95):
        assert xid in XID_TABLE and XID_TABLE[xid][1]  # every row carries a reason
    assert classify_xid(79).exit_code == exitcodes.REPLACE_NODE
    assert classify_xid(13).exit_code == exitcodes.RESTART_HERE
    # an XID we have no row for does not drain a node by default; a site can choose to
    assert classify_xid(999).exit_code == exitcodes.RESTART_HERE
    assert classify_xid(999, unknown=REPLACE_NODE).exit_code == exitcodes.REPLACE_NODE


# (message, expected verdict or None)
MESSAGES = [
    # CUDA ECC from the runtime
    ("RuntimeError: CUDA error: uncorrectable ECC error encountered", REPLACE_NODE),
    # a bug in the program: restarting repeats it
    ("RuntimeError: CUDA error: device-side assert triggered", DO_NOT_REQUEUE),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", DO_NOT_REQUEUE),
    # usually software, restart in place
    ("RuntimeError: CUDA error: an illegal memory access was encountered", RESTART_HERE),
    # NCCL: a peer died or hung -> this node is fine
    ("[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=77, OpType=ALLREDUCE) ran for "
     "600000 milliseconds before timing out.", RESTART_HERE),
    ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or "
     "there was a network error, NCCL version 2.19.3 ncclRemoteError", RESTART_HERE),
    ("NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details), ncclSystemError", RESTART_HERE),
    ("ncclInvalidUsage: This usually reflects invalid usage of NCCL library.", DO_NOT_REQUEUE),
    # the device vanished
    ("RuntimeError: No CUDA GPUs are available / no CUDA-capable device is detected", REPLACE_NODE),
    # NCCL's heartbeat monitor: the watchdog thread itself is stuck
    ("[PG 0 Rank 1] Heartbeat monitor timed out! Process will be terminated after dumping debug info.", RESTART_HERE),
    # RDMA: a remote failure restarts, a local HCA fault drains
    ("NET/IB : Got completion from peer 10.0.0.2<5555> with error 12, opcode 0, len 0, vendor err 129 "
     "(transport retry counter exceeded)", RESTART_HERE),
    ("NET/IB : Got completion with error 4, opcode 1 (IBV_WC_LOC_PROT_ERR: Local protection error)", REPLACE_NODE),
    ("RuntimeError: CUDA error: the launch timed out and was terminated", RESTART_HERE),
    # the kernel's OOM killer (dmesg / a worker's exit record)
    ("Out of memory: Killed process 4242 (python) total-vm:1234kB, anon-rss:999kB", DO_NOT_REQUEUE),
    # gloo on CPU: a peer died
    ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
     "[127.0.0.1]:1234", RESTART_HERE),
    # not an error we know
    ("ValueError: shapes (3,4) and (5,6) not aligned", None),
]


@pytest.mark.parametrize("message, verdict", MESSAGES, ids=[m[0][:30] for m in MESSAGES])
def test_classify_message(message, verdict):
    c = classify_message(message)
    assert (c.verdict if c else None) == verdict


def test_kernel_log_probe_tails_a_file(tmp_path):
    log = tmp_path / "kern.log"
    log.write_text("old: NVRM: Xid (PCI:0000:01:00): 79, history before we started\n")
    probe = KernelLogXidProbe(tail_file(str(log)))
    assert probe.poll() == []  # history is not news
    with open(log, "a") as f:
        f.write("kernel: usb 1-1: new device\nkernel: NVRM: Xid (PCI:0000:3b:00): 48, DBE\nkernel: NVRM: Xi")
    events = probe.poll()
    assert [(e.device, e.classification.xid) for e in events] == [("PCI:0000:3b:00", 48)]
    with open(log, "a") as f:
        f.write("d (PCI:0000:3b:00): 95, Uncontained\n")  # the partial line completes
    assert [e.classification.xid for e in probe.poll()] == [95]


def test_fake_probe():
    p = FakeProbe()
    assert p.poll() == []
    p.inject_xid(48)
    (e,) = p.poll()
    assert e.fatal and e.classification.exit_code == exitcodes.REPLACE_NODE
    assert p.poll() == []


def test_nvml_probe_fails_cleanly_without_gpu():
    # nvidia-ml-py may or may not be installed; there is no NVIDIA driver on CPU test hosts.
    with pytest.raises((StreamshardError, MissingDependencyError)) as info:
        NvmlProbe()
    assert "NVML" in str(info.value) or "nvidia-ml-py" in str(info.value)
    messages = []
    assert available_probes(None, log=messages.append) == []
    assert messages and "NVML probe disabled" in messages[0]


def test_exit_codes_are_distinct_and_documented():
    codes = [exitcodes.OK, exitcodes.RESTART_HERE, exitcodes.HANG, exitcodes.REPLACE_NODE, exitcodes.DO_NOT_REQUEUE]
    assert len(set(codes)) == 5 and all(0 <= c < 128 for c in codes)
    assert exitcodes.describe(exitcodes.HANG) == "hang" and exitcodes.describe(3) == "exit-3"


# ---- fault plan -------------------------------------------------------------------------------


def test_parse_fault_plan():
    plan = parse_fault_plan("kill@120:rank1, hang@300:rank0,spike@500,nan@700,slow@200-260:rank1=0.5,xid@800:rank0=48")
    assert plan.faults == (
        Fault("kill", 120, 120, 1, 0.0), Fault("hang", 300, 300, 0, 0.0), Fault("spike", 500, 500, None, 50.0),
        Fault("nan", 700, 700, None, 0.0), Fault("slow", 200, 260, 1, 0.5), Fault("xid", 800, 800, 0, 48.0),
    )
    assert plan.at("slow", 230, 1) == (plan.faults[4],)
    assert plan.at("slow", 230, 0) == () and plan.at("slow", 261, 1) == ()
    assert plan.at("spike", 500, 7)  # no rank: every rank
    assert fault_plan_from_env({}).faults == () and not fault_plan_from_env({})


@pytest.mark.parametrize("text, match", [
    ("boom@3", "kind must be one of"),  # unknown kind
    ("kill@", "does not match"),  # no step
    ("slow@9-3", "start <= stop"),  # reversed range
    ("kill@3:node1", "does not match"),  # only ranks can be targeted
])
def test_fault_plan_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_fault_plan(text)


class FakeNvml:
    """The slice of the pynvml API NvmlProbe uses, scripted: one GPU, queued XID events, an ECC
    counter and throttle bits the test sets. (Real NVML needs an NVIDIA driver.)"""

    class NVMLError(Exception):
        pass

    NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC = 1, 0
    nvmlEventTypeXidCriticalError = 8
    nvmlClocksThrottleReasonHwSlowdown, nvmlClocksThrottleReasonHwThermalSlowdown = 0x8, 0x40
    nvmlClocksThrottleReasonHwPowerBrakeSlowdown = 0x80

    class Event:
        def __init__(self, xid):
            self.eventData, self.device = xid, "handle0"

    NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 180

    class FieldValue:
        class V:
            def __init__(self, v):
                self.uiVal = v

        def __init__(self, v):
            self.nvmlReturn, self.value = 0, self.V(v)

    def __init__(self, init_error=None):
        self.init_error, self.xids, self.ecc, self.throttle, self.shut = init_error, [], 0, 0, False
        self.action = 0

    def nvmlDeviceGetFieldValues(self, handle, fields):
        assert fields == [self.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
        return [self.FieldValue(self.action)]

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"handle{i}"

    def nvmlEventSetCreate(self):
        return "set"

    def nvmlDeviceRegisterEvents(self, handle, mask, events):
        assert mask == self.nvmlEventTypeXidCriticalError

    def nvmlEventSetWait(self, events, timeout_ms):
        if not self.xids:
            raise self.NVMLError("Timeout")
        return self.Event(self.xids.pop(0))

    def nvmlDeviceGetTotalEccErrors(self, handle, kind, counter):
        return self.ecc

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return self.throttle | 0x1  # 0x1 (GPU idle) is not a slowdown and must be ignored

    def nvmlDeviceGetIndex(self, device):
        return 0

    def nvmlEventSetFree(self, events):
        pass

    def nvmlShutdown(self):
        self.shut = True


def test_nvml_probe_translates_events():
    nv = FakeNvml()
    probe = NvmlProbe(nvml=nv)
    assert probe.poll() == []
    nv.xids = [79, 94]
    nv.ecc = 2  # uncorrected ECC errors appeared
    nv.throttle = FakeNvml.nvmlClocksThrottleReasonHwThermalSlowdown
    events = probe.poll()
    assert [(e.kind, e.fatal) for e in events] == [("xid", True), ("xid", True), ("ecc", True), ("throttle", False)]
    assert events[0].classification.verdict == REPLACE_NODE and events[1].classification.verdict == RESTART_HERE
    assert "0x40" in events[3].detail
    assert probe.poll() == []  # nothing new: same ECC count, same throttle state
    probe.close()
    assert nv.shut


def test_nvml_recommended_action_decides_over_the_xid_table():
    nv = FakeNvml()
    probe = NvmlProbe(nvml=nv)
    nv.xids, nv.action = [13], 1  # XID 13 is an application error in our table, but NVML says: reset the GPU
    (xid,) = probe.poll()
    assert xid.classification.verdict == REPLACE_NODE and "NVML recommends GPU reset" in xid.classification.reason
    assert probe.poll() == []  # the same action is reported once
    nv.action = 0
    nv.xids = [13]
    (again,) = probe.poll()
    assert again.classification.verdict == RESTART_HERE
    nv.action = 2  # a recommendation without an XID event still drains the node
    (ev,) = probe.poll()
    assert ev.kind == "recovery-action" and ev.classification.verdict == REPLACE_NODE


def test_nvml_init_failure_is_a_streamshard_error():
    with pytest.raises(StreamshardError, match="NVML is not available"):
        NvmlProbe(nvml=FakeNvml(init_error="Driver Not Loaded"))
