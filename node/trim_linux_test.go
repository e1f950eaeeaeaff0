package node

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// rssFileKB returns this process's file-backed resident memory (KB).
func rssFileKB(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/smaps_rollup")
	if err != nil {
		t.Skip(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Pss_File:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	t.Skip("no Pss_File in smaps_rollup")
	return 0
}

// The idle agent's RSS is mostly its own executable's pages, touched once
// at start-up: paging them out must shrink the file-backed part.
func TestPageOutExecutable(t *testing.T) {
	before := rssFileKB(t)
	n, err := pageOutExecutable()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFileKB(t)
	t.Logf("advised %d KB; file-backed PSS %d KB -> %d KB", n>>10, before, after)
	if n == 0 || after >= before/2 {
		t.Errorf("file-backed PSS %d KB -> %d KB after paging out %d KB of the executable; want it at least halved", before, after, n>>10)
	}
	// Its read-only mappings are advised random (VmFlags "rr": no
	// read-ahead); its writable data is not.
	exe, _ := os.Readlink("/proc/self/exe")
	smaps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	var head []string
	readOnly := 0
	for _, l := range strings.Split(string(smaps), "\n") {
		if fs := strings.Fields(l); len(fs) >= 5 && strings.Contains(fs[0], "-") && len(fs[1]) == 4 {
			head = fs
			continue
		}
		flags, ok := strings.CutPrefix(l, "VmFlags:")
		if !ok || len(head) < 6 || head[5] != exe {
			continue
		}
		rr := slices.Contains(strings.Fields(flags), "rr")
		if head[1][1] == 'w' {
			if rr {
				t.Errorf("writable mapping %s advised random", head[0])
			}
			continue
		}
		readOnly++
		if !rr {
			t.Errorf("read-only mapping %s %s not advised random (read-ahead on)", head[0], head[1])
		}
	}
	if readOnly == 0 {
		t.Errorf("no read-only mapping of %s found", exe)
	}
}
