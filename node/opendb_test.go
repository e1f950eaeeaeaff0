package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// Issue 16: a corrupt vmesh.db is a clear error naming the file and what
// to do, never a panic (bbolt panics on a damaged freelist and faults on a
// truncated file).
func TestCorruptStateDatabase(t *testing.T) {
	for name, damage := range map[string]func([]byte) []byte{
		"pages scrambled": func(b []byte) []byte {
			for i := 2 * os.Getpagesize(); i < len(b); i++ {
				b[i] ^= 0x5a
			}
			return b
		},
		"truncated":    func(b []byte) []byte { return b[:3*os.Getpagesize()-100] },
		"all garbage":  func(b []byte) []byte { return []byte(strings.Repeat("garbage!", 2048)) },
		"meta damaged": func(b []byte) []byte { b[20] ^= 0xff; b[os.Getpagesize()+20] ^= 0xff; return b },
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "vmesh.db")
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			db.Update(func(tx *bolt.Tx) error {
				b, _ := tx.CreateBucketIfNotExists([]byte("discovery/peers"))
				for i := range 200 {
					b.Put([]byte(strings.Repeat("k", i+1)), []byte(strings.Repeat("v", 100)))
				}
				return nil
			})
			db.Close()
			raw, _ := os.ReadFile(path)
			os.WriteFile(path, damage(raw), 0o600)
			db, err = openDB(path)
			if err == nil {
				db.Close()
				t.Fatal("a corrupt database opened without error")
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), "move the file away") {
				t.Errorf("error %q does not name the file and what to do", err)
			}
		})
	}
}
