"""Live progress: worker processes write counter files under OUT/_progress/ that the driver renders on a
terminal and removes at the end; without a terminal nothing is drawn. Runs the real `mmcorpus interleaved`
on trafilatura-eval pages under a pseudo-terminal and with plain pipes."""

import os
import pty
import select
import subprocess
import sys
import time

from mmcorpus.pipelines.runtime import progress


def pages(shared_data, n=None):
    folder = shared_data / "trafilatura-eval" / "pages"
    return sorted(str(folder / f) for f in os.listdir(folder))[:n]


def watch(proc, out_dir, read_fd=None, timeout=240):
    """Wait for `proc`, collecting what it prints on `read_fd` and every progress file name seen meanwhile."""
    seen, buf, deadline, eof = set(), b"", time.time() + timeout, read_fd is None
    while time.time() < deadline:
        try:
            seen.update(os.listdir(out_dir / progress.PROGRESS_DIR))
        except OSError:
            pass
        if not eof and select.select([read_fd], [], [], 0.05)[0]:
            try:
                chunk = os.read(read_fd, 65536)
            except OSError:  # EIO: the child side of the terminal is closed
                chunk = b""
            buf += chunk
            eof = not chunk
            continue
        if proc.poll() is not None and (eof or read_fd is None):
            break
        if read_fd is None or eof:
            time.sleep(0.05)
    proc.wait(timeout=5)
    return seen, buf.decode(errors="replace")


def command(out, inputs, *extra):
    return [sys.executable, "-m", "mmcorpus.pipelines.cli", "interleaved", *inputs, "-o", str(out), "--no-images", *extra]


def test_terminal_run_shows_progress_from_worker_processes_and_cleans_up(tmp_path, shared_data):
    out = tmp_path / "tty"
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(command(out, pages(shared_data), "--workers", "2"), stdin=child_fd, stdout=child_fd,
                            stderr=child_fd, close_fds=True, env={**os.environ, "COLUMNS": "160"})
    os.close(child_fd)
    seen, text = watch(proc, out, main_fd)
    os.close(main_fd)
    assert proc.returncode == 0, text[-2000:]
    files = {name for name in seen if name.endswith(".json")}
    pids = {name.rsplit("-", 2)[1] for name in files}
    assert files and str(proc.pid) not in pids  # written by Beam's worker processes, not the driver
    assert not (out / progress.PROGRESS_DIR).exists()
    frames = [f for f in text.split("\r\x1b[K") if f.startswith("interleaved ")]
    assert frames, text[-2000:]
    assert any("read 144" in f and "rejected" in f and "/s)" in f for f in frames)
    # the end-of-run summary points to stats, rejects and the card
    assert "finished in" in text and f"stats    {out}/stats.json" in text
    extract_row = next(line for line in text.splitlines() if line.strip().startswith("extract "))
    assert "cpu s" in text and "%" in extract_row  # CPU seconds and share of every timed stage
    assert f"rejects  {out}/rejects/" in text and f"mmcorpus card {out}" in text


def test_piped_run_draws_nothing_and_writes_no_progress_files(tmp_path, shared_data):
    out = tmp_path / "pipe"
    proc = subprocess.Popen(command(out, pages(shared_data, 12), "--workers", "1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen, _ = watch(proc, out)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-2000:]
    assert not seen and not (out / progress.PROGRESS_DIR).exists()
    assert b"\r" not in stdout + stderr and b"\x1b[" not in stdout + stderr
    assert b"read 12 -> written" in stderr  # the summary still comes, once, at the end


def test_status_line_sums_worker_files(tmp_path):
    folder = tmp_path / "_progress"
    folder.mkdir()
    (folder / "a.json").write_text('{"read\\tin\\t": 10, "read\\tout\\t": 10, "lang\\tin\\t": 10, '
                                   '"lang\\trejected\\tlanguage_low_confidence": 3, "lang\\tout\\t": 7}')
    (folder / "b.json").write_text('{"read\\tin\\t": 5, "read\\tout\\t": 5, "lang\\tin\\t": 2, "lang\\tout\\t": 2, '
                                   '"imgs\\trejected\\timage_format": 4}')
    (folder / "c.json.tmp").write_text("{half")
    counts = progress.read_counts(str(folder))
    assert counts[("read", "in", "")] == 15 and counts[("lang", "out", "")] == 9
    line = progress.status_line("test", counts, ["read", "lang"], 5.0)
    assert line == "test 0:05 | read 15 (3/s) | at lang 12 | kept 9 | rejected 3: language_low_confidence 3"
