"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

import json
import os
import platform
import re


def machine_info(**extra):
    """The machine a benchmark ran on: platform, processor model, cores, plus `extra`."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        processor = names[0] if names else processor
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": processor,
        "cpu_count": os.cpu_count(),
        **extra,
    }


def write_json(path, payload):
    """Writes `payload` to `path` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_figure(fig, path):
    """Saves a matplotlib figure as PNG atomically, then closes it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
