package main

import (
	"bufio"
	"os"
	"slices"
	"strings"
	"testing"
)

// The binary's read-only mappings (its code among them) are advised random
// (VmFlags "rr": no fault-around); its writable data and other files'
// mappings are left alone.
func TestMapOnlyWhatRuns(t *testing.T) {
	n, err := mapOnlyWhatRuns()
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Fatal("no mapping of the binary advised")
	}
	exe, _ := os.Executable()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var code, advised, writable int
	var head []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := sc.Text()
		if fs := strings.Fields(l); len(fs) >= 5 && strings.Contains(fs[0], "-") && len(fs[1]) == 4 {
			head = fs
			continue
		}
		flags, ok := strings.CutPrefix(l, "VmFlags:")
		if !ok || len(head) < 6 || head[5] != exe {
			continue
		}
		rr := slices.Contains(strings.Fields(flags), "rr")
		switch perm := head[1]; {
		case perm[1] == 'w':
			writable++
			if rr {
				t.Errorf("writable mapping %s advised", head[0])
			}
		default:
			if perm[2] == 'x' {
				code++
			}
			if rr {
				advised++
			} else {
				t.Errorf("read-only mapping %s %s not advised", head[0], perm)
			}
		}
	}
	if code == 0 || advised == 0 {
		t.Errorf("found %d code mappings of %s, %d advised", code, exe, advised)
	}
}
