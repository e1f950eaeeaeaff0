package discovery

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"time"

	"go.etcd.io/bbolt"
)

// Buckets of Options.DB this package owns.
var (
	bucketPeers = []byte("discovery/peers") // node name → storedPeer (JSON)
	bucketSelf  = []byte("discovery/self")  // "version" → uint64, big endian
	bucketAddrs = []byte("discovery/addrs") // member address (4 or 16 bytes) → first seen, unix seconds
	keyVersion  = []byte("version")
)

// storedPeer is a host seen alive, remembered so that a restarted host can
// rejoin without its join list.
type storedPeer struct {
	Addr netip.AddrPort `json:"addr"`
	Seen time.Time      `json:"seen"`
}

// loadStore reads the remembered peers and catalog version.
func (d *Discovery) loadStore() error {
	if d.db == nil {
		return nil
	}
	return d.db.View(func(tx *bbolt.Tx) error {
		if b := tx.Bucket(bucketSelf); b != nil {
			if v := b.Get(keyVersion); len(v) == 8 {
				d.version = binary.BigEndian.Uint64(v)
			}
		}
		if b := tx.Bucket(bucketAddrs); b != nil {
			b.ForEach(func(k, _ []byte) error {
				if a, ok := netip.AddrFromSlice(k); ok {
					d.meshAddrs[a.Unmap()] = struct{}{}
				}
				return nil
			})
		}
		b := tx.Bucket(bucketPeers)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			var p storedPeer
			if err := json.Unmarshal(v, &p); err != nil || !p.Addr.IsValid() {
				return nil // skip a damaged record
			}
			if string(k) != d.name {
				d.storedPeers[string(k)] = p
			}
			return nil
		})
	})
}

// flushStore writes the peers and the version changed since the last
// flush, in one transaction.
func (d *Discovery) flushStore() {
	if d.db == nil {
		return
	}
	d.mu.Lock()
	peers := d.dirtyPeers
	d.dirtyPeers = map[string]*storedPeer{}
	version, saveVersion := d.version, d.saveVersion
	d.saveVersion = false
	addrs := d.dirtyAddrs
	d.dirtyAddrs = nil
	now := time.Now()
	for name, p := range peers {
		if p == nil {
			delete(d.storedPeers, name)
			continue
		}
		p.Seen = now
		d.storedPeers[name] = *p
	}
	d.mu.Unlock()
	if len(peers) == 0 && !saveVersion && len(addrs) == 0 {
		return
	}
	err := d.db.Update(func(tx *bbolt.Tx) error {
		if saveVersion {
			b, err := tx.CreateBucketIfNotExists(bucketSelf)
			if err != nil {
				return err
			}
			if err := b.Put(keyVersion, binary.BigEndian.AppendUint64(nil, version)); err != nil {
				return err
			}
		}
		if len(addrs) > 0 {
			b, err := tx.CreateBucketIfNotExists(bucketAddrs)
			if err != nil {
				return err
			}
			seen := binary.BigEndian.AppendUint64(nil, uint64(now.Unix()))
			for _, a := range addrs {
				if b.Get(a.AsSlice()) == nil {
					if err := b.Put(a.AsSlice(), seen); err != nil {
						return err
					}
				}
			}
		}
		b, err := tx.CreateBucketIfNotExists(bucketPeers)
		if err != nil {
			return err
		}
		for name, p := range peers {
			if p == nil {
				if err := b.Delete([]byte(name)); err != nil {
					return err
				}
				continue
			}
			v, err := json.Marshal(p)
			if err != nil {
				return err
			}
			if err := b.Put([]byte(name), v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		d.log.Warn("saving gossip peers", "err", fmt.Errorf("writing the state database: %w", err))
	}
}
