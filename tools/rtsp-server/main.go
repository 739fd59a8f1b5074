// Command rtsp-server is a small RTSP relay for StreamHarness's integration tests: a publisher
// (ffmpeg -f rtsp, ANNOUNCE + RECORD) pushes a stream to a path, and any number of readers
// (DESCRIBE + SETUP + PLAY) pull it from the same path, over TCP (interleaved) or UDP.
//
// It listens on 127.0.0.1 only: it has no authentication and exists to give the pulled-source
// tests a real RTSP server (gortsplib), not to serve cameras. Built and started by
// streamharness.devinfra.media.RtspServer.
//
// When a publisher goes away (its control connection closes, or no RTP arrives for -read-timeout
// over UDP), its path is dropped and every reader of it is disconnected: that is what a reader sees
// when a camera dies, and what the puller's reconnect logic is tested against.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"
	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/pion/rtp"
)

// publication is one path being published: the stream readers are attached to, and who feeds it.
type publication struct {
	stream  *gortsplib.ServerStream
	session *gortsplib.ServerSession
	conn    *gortsplib.ServerConn
}

// relay routes each publisher's RTP packets to the readers of its path.
type relay struct {
	server *gortsplib.Server
	mu     sync.Mutex
	paths  map[string]*publication
}

func (r *relay) find(path string) *gortsplib.ServerStream {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p, ok := r.paths[path]; ok {
		return p.stream
	}
	return nil
}

// dropLocked ends a publication: its stream closes, which closes every reader's session.
func (r *relay) dropLocked(path string, why string) {
	p, ok := r.paths[path]
	if !ok {
		return
	}
	delete(r.paths, path)
	p.stream.Close()
	log.Printf("path %q: publication ended (%s)", path, why)
}

func (r *relay) OnConnClose(ctx *gortsplib.ServerHandlerOnConnCloseCtx) {
	// A UDP publisher's session outlives its control connection in RTSP; tie it to the connection
	// so that a killed publisher is noticed at once rather than after -read-timeout.
	r.mu.Lock()
	var orphan *gortsplib.ServerSession
	for _, p := range r.paths {
		if p.conn == ctx.Conn {
			orphan = p.session
		}
	}
	r.mu.Unlock()
	if orphan != nil {
		orphan.Close()
	}
}

func (r *relay) OnSessionClose(ctx *gortsplib.ServerHandlerOnSessionCloseCtx) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for path, p := range r.paths {
		if p.session == ctx.Session {
			r.dropLocked(path, fmt.Sprintf("publisher session closed: %v", ctx.Error))
		}
	}
}

func (r *relay) OnDescribe(ctx *gortsplib.ServerHandlerOnDescribeCtx) (*base.Response, *gortsplib.ServerStream, error) {
	stream := r.find(ctx.Path)
	if stream == nil {
		return &base.Response{StatusCode: base.StatusNotFound}, nil, nil
	}
	return &base.Response{StatusCode: base.StatusOK}, stream, nil
}

func (r *relay) OnAnnounce(ctx *gortsplib.ServerHandlerOnAnnounceCtx) (*base.Response, error) {
	stream := &gortsplib.ServerStream{Server: r.server, Desc: ctx.Description}
	if err := stream.Initialize(); err != nil {
		return &base.Response{StatusCode: base.StatusInternalServerError}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if old, ok := r.paths[ctx.Path]; ok {
		// A camera that restarts before its old session timed out takes its path back.
		r.dropLocked(ctx.Path, "replaced by a new publisher")
		go old.session.Close()
	}
	r.paths[ctx.Path] = &publication{stream: stream, session: ctx.Session, conn: ctx.Conn}
	log.Printf("path %q: publisher %v announced %d media", ctx.Path, ctx.Conn.NetConn().RemoteAddr(), len(ctx.Description.Medias))
	return &base.Response{StatusCode: base.StatusOK}, nil
}

func (r *relay) OnSetup(ctx *gortsplib.ServerHandlerOnSetupCtx) (*base.Response, *gortsplib.ServerStream, error) {
	if ctx.Session.State() == gortsplib.ServerSessionStatePreRecord {
		return &base.Response{StatusCode: base.StatusOK}, nil, nil // a publisher's SETUP
	}
	stream := r.find(ctx.Path)
	if stream == nil {
		return &base.Response{StatusCode: base.StatusNotFound}, nil, nil
	}
	return &base.Response{StatusCode: base.StatusOK}, stream, nil
}

func (r *relay) OnPlay(ctx *gortsplib.ServerHandlerOnPlayCtx) (*base.Response, error) {
	log.Printf("path %q: reader %v playing", ctx.Path, ctx.Conn.NetConn().RemoteAddr())
	return &base.Response{StatusCode: base.StatusOK}, nil
}

func (r *relay) OnRecord(ctx *gortsplib.ServerHandlerOnRecordCtx) (*base.Response, error) {
	stream := r.find(ctx.Path)
	if stream == nil {
		return &base.Response{StatusCode: base.StatusNotFound}, nil
	}
	ctx.Session.OnPacketRTPAny(func(medi *description.Media, _ format.Format, pkt *rtp.Packet) {
		// A closed stream (the path was taken over) refuses the packet; nothing to do about it.
		_ = stream.WritePacketRTP(medi, pkt)
	})
	return &base.Response{StatusCode: base.StatusOK}, nil
}

func main() {
	port := flag.Int("port", 8554, "RTSP (TCP) port on 127.0.0.1")
	rtpPort := flag.Int("rtp-port", 0, "UDP port for RTP (even; RTCP is the next one); 0: UDP transport off")
	readTimeout := flag.Duration("read-timeout", 5*time.Second, "a publisher that sends nothing this long is dropped")
	flag.Parse()

	r := &relay{paths: map[string]*publication{}}
	r.server = &gortsplib.Server{
		Handler:     r,
		RTSPAddress: fmt.Sprintf("127.0.0.1:%d", *port),
		ReadTimeout: *readTimeout,
	}
	if *rtpPort != 0 {
		if *rtpPort%2 != 0 {
			log.Fatalf("-rtp-port %d must be even (RTCP uses the next port)", *rtpPort)
		}
		r.server.UDPRTPAddress = fmt.Sprintf("127.0.0.1:%d", *rtpPort)
		r.server.UDPRTCPAddress = fmt.Sprintf("127.0.0.1:%d", *rtpPort+1)
	}
	if err := r.server.Start(); err != nil {
		log.Fatalf("cannot start: %v", err)
	}
	// The line the Python side waits for before it hands out URLs.
	fmt.Printf("ready rtsp://127.0.0.1:%d\n", *port)
	os.Stdout.Sync()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		r.server.Close()
	}()
	err := r.server.Wait()
	log.Printf("stopped: %v", err)
}
