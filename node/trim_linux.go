package node

import (
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
// are first advised MADV_RANDOM, which turns read-ahead off for them: a page
// read back from the file is read alone, not with the pages after it (the
// kernel's fault-around still maps the neighbours that are in the page
// cache). It returns the bytes paged out.
//
// It parses /proc/self/maps before the first madvise: work done after a
// mapping is paged out (parsing, allocating, a heap-profile sample that
// unwinds the stack through the function table) faults its pages back in
// at once.
func pageOutExecutable() (int64, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, fmt.Errorf("paging out the executable: %w", err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("paging out the executable: %w", err)
	}
	type mapping struct {
		start, end uint64
		readOnly   bool
	}
	var ms []mapping
	for line := range strings.Lines(string(maps)) {
		// start-end perms offset dev inode path
		fields := strings.Fields(line)
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
		ms = append(ms, mapping{start, end, fields[1][1] != 'w'})
	}
	var total int64
	for _, m := range ms {
		if m.readOnly {
			if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(m.start), uintptr(m.end-m.start), unix.MADV_RANDOM); errno != 0 {
				return total, fmt.Errorf("advising the executable: madvise: %w", errno)
			}
		}
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(m.start), uintptr(m.end-m.start), unix.MADV_PAGEOUT); errno != 0 {
			return total, fmt.Errorf("paging out the executable: madvise: %w", errno)
		}
		total += int64(m.end - m.start)
	}
	return total, nil
}
