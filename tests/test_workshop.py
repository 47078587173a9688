"""The workshop's preflight check (mtplab.workshop): it finds other notebook kernels and says what to do."""
import subprocess
import sys
import time

from mtplab import workshop


def test_preflight_names_the_cpu_and_other_kernels():
    text = workshop.preflight()
    assert text.startswith(f"CPU: {workshop.cpu_model()}") and "memory available" in text
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ipykernel_launcher", "-f", "x.json"])
    try:
        time.sleep(0.5)
        found = [k for k in workshop.other_kernels() if k["pid"] == fake.pid]
        assert len(found) == 1 and found[0]["rss_mb"] > 1
        text = workshop.preflight()
        assert f"{fake.pid}" in text and "shut them down (Kernel → Shut Down Kernel" in text
        assert "needs about 10,000,000 MB" in workshop.preflight(kernel_mb=1e7)  # not enough memory: said so
    finally:
        fake.kill()
        fake.wait()
    assert fake.pid not in [k["pid"] for k in workshop.other_kernels()]
