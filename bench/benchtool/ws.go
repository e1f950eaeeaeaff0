package main

import (
	"bytes"
	"fmt"
	"time"

	"golang.org/x/net/websocket"
)

// wsEcho returns every message it receives, as it came, until the client
// closes.
func wsEcho(ws *websocket.Conn) {
	defer ws.Close()
	var msg []byte
	for {
		if err := websocket.Message.Receive(ws, &msg); err != nil {
			return
		}
		if err := websocket.Message.Send(ws, msg); err != nil {
			return
		}
	}
}

// wsLoop opens conns WebSocket connections to url; each sends a binary
// message, waits for its echo and checks it, in turn, for d. Its result
// counts echoed messages.
func wsLoop(url string, conns int, d time.Duration, size int) (LoopResult, error) {
	payload := bytes.Repeat([]byte{'w'}, size)
	return loop(conns, d, func() (func() error, func(), error) {
		ws, err := websocket.Dial(url, "", "http://bench.local/")
		if err != nil {
			return nil, nil, fmt.Errorf("opening websocket: %w", err)
		}
		var got []byte
		op := func() error {
			ws.SetDeadline(time.Now().Add(5 * time.Second))
			if err := websocket.Message.Send(ws, payload); err != nil {
				return err
			}
			if err := websocket.Message.Receive(ws, &got); err != nil {
				return err
			}
			if !bytes.Equal(got, payload) {
				return fmt.Errorf("echo of %d bytes came back as %d", len(payload), len(got))
			}
			return nil
		}
		return op, func() { ws.Close() }, nil
	})
}
