"""What differs between operating systems, in one place, each with what happens where it is missing.

- The out dir's lock (`lock`, `remove_locked`): fcntl.flock on Linux and macOS; on Windows
  msvcrt.locking of one byte far past the end of the lock file, so that the holder's pid at
  its start stays readable (Windows forbids reading locked bytes). Both are released by the
  system when their process ends in any way. Where neither exists there is no lock.
- File-open flags (`NOFOLLOW`, `NONBLOCK`, `CLOEXEC`, `BINARY`): each is 0 where the system
  lacks it, so or-ing it in changes nothing. Without NOFOLLOW, callers check for a link
  themselves; without NONBLOCK (Windows has no FIFOs) there is nothing to make non-blocking.
- `set_mode`: fchmod where it exists; elsewhere files keep the mode they were created with.
- `usable_cores`: the cores this process may run on (sched_getaffinity, Linux), else every core.
- `keep_freed_memory`: tunes glibc's malloc with mallopt; a no-op that returns False on any
  other C library (macOS, Windows, musl).
- `resident_memory`: this process's current and peak resident bytes: Linux's /proc/self/status;
  else the peak from getrusage's ru_maxrss (KiB on Linux, bytes on macOS) with the current
  size unknown; on Windows GetProcessMemoryInfo; None for each figure the system does not give.
- `physical_memory`: sysconf on Linux and macOS, GlobalMemoryStatusEx on Windows, else None.
- `cores_idle_seconds`: how long all cores have been idle, from Linux's /proc/stat; None
  elsewhere, where sampling leaves the BLAS its own thread count.
- `cpu_name`: the processor's model name from Linux's /proc/cpuinfo, else what `platform` says.
"""

import ctypes
import errno
import os
import platform
import sys

PROC_STAT = "/proc/stat"
PROC_STATUS = "/proc/self/status"
PROC_CPUINFO = "/proc/cpuinfo"

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
BINARY = getattr(os, "O_BINARY", 0)

try:
    import fcntl
except ImportError:
    fcntl = None
    try:
        import msvcrt
    except ImportError:
        msvcrt = None

# The byte msvcrt locks: past any pid written at the start, and within the 31-bit offsets its seek takes.
LOCKED_BYTE = 1 << 30
# What msvcrt.locking raises (as OSError) when another process holds the byte.
HELD_ELSEWHERE = {errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def lock(fd):
    """Lock the open file `fd` for this process until it is closed or the process ends.

    Raises BlockingIOError at once when another process holds it. Returns False, without
    locking, where the system has no file locks.
    """
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    if msvcrt is None:
        return False
    os.lseek(fd, LOCKED_BYTE, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as err:
        if err.errno in HELD_ELSEWHERE:
            raise BlockingIOError(err.errno, err.strerror) from None
        raise
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return True


def remove_locked(path, file):
    """Delete the lock file `path` while `file`, its open and locked file object, still holds the lock.

    Deleting it while locked means no other process can be holding it. Windows refuses to delete
    an open file: there `file` is closed first (the lock goes with it) and the file deleted then,
    unless another process has opened it meanwhile: Windows refuses again, and the file is theirs.
    """
    try:
        path.unlink(missing_ok=True)
    except PermissionError:
        file.close()
        try:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass


def set_mode(fd, mode):
    """chmod the open file `fd` where the system has fchmod; elsewhere it keeps the mode it was created with."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)


def usable_cores():
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def keep_freed_memory():
    """Have the C allocator keep freed memory for reuse instead of handing it back to the kernel.

    Every training step allocates and frees the same large arrays. glibc by default
    maps each array above 128 KiB afresh and unmaps it when freed, so each step's
    arrays start as untouched pages that the kernel must fault in and zero: about
    20,000 page faults per `small` step, a tenth of its time, and a fifth of a `baby`
    step's. Kept in the heap, freed arrays are reused as they are; the peak barely
    moves. Returns False (and changes nothing) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h>
    return bool(
        mallopt(m_mmap_threshold, 1 << 30)          # arrays up to 1 GiB come from the heap, not fresh maps
        and mallopt(m_trim_threshold, -1)           # free memory at the heap's top stays in the heap
        and mallopt(m_top_pad, 1 << 27)             # and heaps grow 128 MiB at a time, not an array at a time
    )


def resident_memory():
    """(current, peak) resident bytes of this process; None for a figure the system does not give.

    Linux's /proc/self/status gives both (VmRSS, VmHWM). Without it the peak is getrusage's
    ru_maxrss, which counts KiB on Linux and bytes on macOS; on Linux it also carries over
    from the parent process across exec, so a child started by a large parent reports the
    parent's size. Windows gives both through GetProcessMemoryInfo.
    """
    try:
        with open(PROC_STATUS, encoding="utf-8") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return tuple(int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM"))  # the values are in kB
    except (OSError, KeyError, ValueError, IndexError):
        pass
    if sys.platform == "win32":
        return windows_memory()
    try:
        import resource
    except ImportError:
        return None, None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        return None, peak
    if sys.platform.startswith("linux"):
        return None, peak * 1024
    return None, None  # the BSDs and others count in units of their own


def windows_memory():
    """(current, peak) working set bytes from Windows' GetProcessMemoryInfo, or (None, None)."""
    from ctypes import wintypes

    class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t) for name in (
                "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]

    try:
        kernel32, psapi = ctypes.WinDLL("kernel32"), ctypes.WinDLL("psapi")
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        psapi.GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(Counters), wintypes.DWORD]
        counters = Counters(cb=ctypes.sizeof(Counters))
        if not psapi.GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            return None, None
    except (OSError, AttributeError):
        return None, None
    return counters.WorkingSetSize, counters.PeakWorkingSetSize


def physical_memory():
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    if sys.platform != "win32":
        return None

    class Status(ctypes.Structure):  # MEMORYSTATUSEX
        _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32)] + [
            (name, ctypes.c_uint64) for name in (
                "ullTotalPhys", "ullAvailPhys", "ullTotalPageFile", "ullAvailPageFile", "ullTotalVirtual",
                "ullAvailVirtual", "ullAvailExtendedVirtual")]

    status = Status(dwLength=ctypes.sizeof(Status))
    try:
        if ctypes.WinDLL("kernel32").GlobalMemoryStatusEx(ctypes.byref(status)):
            return status.ullTotalPhys
    except (OSError, AttributeError):
        pass
    return None


def cores_idle_seconds():
    """CPU seconds all cores together were idle or waiting for I/O since boot, or None where /proc/stat is missing.

    Time the hypervisor gave to other machines ("steal") is not idle: it is lost to us too.
    """
    try:
        with open(PROC_STAT, encoding="utf-8") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:6]]
    except OSError:
        return None
    idle, iowait = ticks[3], ticks[4]
    return (idle + iowait) / os.sysconf("SC_CLK_TCK")


def cpu_name():
    """The processor's model name where Linux's /proc/cpuinfo gives it, else what `platform` knows."""
    try:
        with open(PROC_CPUINFO, encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
