package discovery

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/hashicorp/memberlist"
)

// GenerateKey returns a new gossip encryption key: 32 random bytes (AES-256),
// base64-encoded, as one line of a key file.
func GenerateKey() (string, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return "", fmt.Errorf("generating gossip key: %w", err)
	}
	return base64.StdEncoding.EncodeToString(k), nil
}

// ParseKeys parses a key file: one base64 key (16, 24 or 32 bytes) per line,
// the first being the one used for sending. Blank lines and lines starting
// with '#' are ignored.
func ParseKeys(data []byte) ([][]byte, error) {
	var keys [][]byte
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("parsing gossip key on line %d: not base64", i+1)
		}
		if err := memberlist.ValidateKey(k); err != nil {
			return nil, fmt.Errorf("parsing gossip key on line %d: %w", i+1, err)
		}
		for _, o := range keys {
			if bytes.Equal(o, k) {
				return nil, fmt.Errorf("parsing gossip key on line %d: duplicate key", i+1)
			}
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, errors.New("parsing gossip keys: no key found")
	}
	return keys, nil
}

// ReadKeyFile reads and parses a key file (see ParseKeys).
func ReadKeyFile(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading gossip key file: %w", err)
	}
	keys, err := ParseKeys(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return keys, nil
}

var errNoEncryption = errors.New("gossip encryption is off: it can only be turned on by a restart with a key file")

func (d *Discovery) keyringOrErr() (*memberlist.Keyring, error) {
	if d.keyring == nil {
		return nil, errNoEncryption
	}
	return d.keyring, nil
}

// InstallKey adds key to the keyring: this host then accepts messages
// encrypted with it. Step 1 of a rotation, on every host.
func (d *Discovery) InstallKey(key []byte) error {
	kr, err := d.keyringOrErr()
	if err != nil {
		return err
	}
	if err := kr.AddKey(key); err != nil {
		return fmt.Errorf("installing gossip key: %w", err)
	}
	return nil
}

// UseKey makes an installed key the one used for sending. Step 2 of a
// rotation, once every host has installed the key.
func (d *Discovery) UseKey(key []byte) error {
	kr, err := d.keyringOrErr()
	if err != nil {
		return err
	}
	if err := kr.UseKey(key); err != nil {
		return fmt.Errorf("using gossip key: %w", err)
	}
	return nil
}

// RemoveKey removes a key that is not the primary one. Step 3 of a rotation,
// once every host sends with the new key.
func (d *Discovery) RemoveKey(key []byte) error {
	kr, err := d.keyringOrErr()
	if err != nil {
		return err
	}
	if err := kr.RemoveKey(key); err != nil {
		return fmt.Errorf("removing gossip key: %w", err)
	}
	return nil
}

// SetKeys makes the keyring equal to keys, keys[0] being the primary: it
// installs the new ones, switches the primary, then removes the others. Node
// calls it with ReadKeyFile's result on reload, so a rotation is three edits
// of the key file on every host (add the new key as a second line; move it
// first; delete the old line), each followed by a reload everywhere.
func (d *Discovery) SetKeys(keys [][]byte) error {
	kr, err := d.keyringOrErr()
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return errors.New("setting gossip keys: no key given (encryption cannot be turned off without a restart)")
	}
	for _, k := range keys {
		if err := kr.AddKey(k); err != nil {
			return fmt.Errorf("setting gossip keys: %w", err)
		}
	}
	if err := kr.UseKey(keys[0]); err != nil {
		return fmt.Errorf("setting gossip keys: %w", err)
	}
	for _, old := range kr.GetKeys() {
		keep := false
		for _, k := range keys {
			keep = keep || bytes.Equal(k, old)
		}
		if !keep {
			if err := kr.RemoveKey(old); err != nil {
				return fmt.Errorf("setting gossip keys: %w", err)
			}
		}
	}
	return nil
}

// Keys returns the installed keys, base64-encoded, the primary first; nil
// when gossip is not encrypted.
func (d *Discovery) Keys() []string {
	if d.keyring == nil {
		return nil
	}
	primary := d.keyring.GetPrimaryKey()
	out := []string{base64.StdEncoding.EncodeToString(primary)}
	for _, k := range d.keyring.GetKeys() {
		if !bytes.Equal(k, primary) {
			out = append(out, base64.StdEncoding.EncodeToString(k))
		}
	}
	return out
}
