package node

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// pageOutExecutable asks the kernel to reclaim the pages of the agent's own
// executable that are mapped in now (MADV_PAGEOUT). Start-up (package
// initialisation, the CA, the first certificates and rules) touches much of
// a 28 MB binary, and the kernel's fault-around maps neighbouring pages too;
// most of it is never used again. The pages are clean copies of the file:
// those the running agent needs fault back in from the page cache, so RSS
// becomes the working set. The read-only mappings (code, constants, tables)
// are first advised MADV_RANDOM, which turns fault-around off for them: a
// page used later is mapped alone, not with the 64 KiB around it. It
// returns the bytes paged out.
func pageOutExecutable() (int64, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, fmt.Errorf("paging out the executable: %w", err)
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("paging out the executable: %w", err)
	}
	defer f.Close()
	var total int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// start-end perms offset dev inode path
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[5] != exe {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		if fields[1][1] != 'w' {
			if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), unix.MADV_RANDOM); errno != 0 {
				return total, fmt.Errorf("advising the executable: madvise: %w", errno)
			}
		}
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), unix.MADV_PAGEOUT); errno != 0 {
			return total, fmt.Errorf("paging out the executable: madvise: %w", errno)
		}
		total += int64(end - start)
	}
	return total, sc.Err()
}
