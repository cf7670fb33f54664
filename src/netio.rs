//! Write coalescing for connections on and to the public port.
//!
//! HTTP/2 (h2, under hyper and tonic) writes a unary gRPC response as three
//! frames — HEADERS, DATA, trailers — and flushes whenever its connection
//! task runs, which on a multi-threaded runtime is often while the stream's
//! task is still producing the next frame. Under TLS every flush became its
//! own TLS record and its own `writev`: measured ~1.9 socket writes per
//! enrollment response at 64 clients, and on loopback the sender's kernel
//! also pays the receiver's TCP processing for each one.
//!
//! [`Coalesced`] sits between h2 and the TLS stream (the public port, and
//! the CLI's, agent's and load generator's connections to it). Writes are
//! buffered (plaintext, bounded); a flush with buffered bytes is deferred once —
//! the connection task re-queues itself behind the tasks already runnable,
//! so frames those tasks are about to queue join the same write — and the
//! next flush encrypts the buffer as one TLS record and sends it with one
//! syscall. Reads pass straight through. Nothing is held past a flush that
//! h2 asked for: the deferral is one scheduler turn, never a timer.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes beyond which a write first drains the buffer (h2 writes
/// at most 16 KiB frames; a full TLS record is 16 KiB of plaintext).
const MAX_BUFFERED: usize = 64 * 1024;

/// An I/O stream whose writes are gathered until flushed (module docs).
/// Its `Debug` shows how many bytes are buffered, never the bytes: they are
/// the connection's plaintext (JWT-SVIDs, signed payloads).
pub struct Coalesced<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner stream has already accepted.
    sent: usize,
    /// The pending flush already yielded once; the next one writes.
    deferred: bool,
}

impl<T> Coalesced<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            sent: 0,
            deferred: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Coalesced<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalesced")
            .field("inner", &self.inner)
            .field("buffered", &(self.buf.len() - self.sent))
            .field("deferred", &self.deferred)
            .finish()
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Hands every buffered byte to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        // Give back a buffer that one large response grew.
        if self.buf.capacity() > MAX_BUFFERED {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes, draining first when they would not
    /// fit. `Ready(true)` means: buffer them; `Ready(false)`: too large to
    /// buffer, write them straight through (the buffer is empty then).
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.buf.len() + len > MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(len <= MAX_BUFFERED))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if !ready!(me.poll_room(cx, data.len()))? {
            return Pin::new(&mut me.inner).poll_write(cx, data);
        }
        me.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum::<usize>();
        if !ready!(me.poll_room(cx, len))? {
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            me.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.buf.is_empty() {
            me.deferred = false;
            return Pin::new(&mut me.inner).poll_flush(cx);
        }
        if !me.deferred {
            // One scheduler turn: the runtime re-polls a task that woke
            // itself after the tasks already queued, which may add frames.
            me.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(me.poll_drain(cx))?;
        me.deferred = false;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        ready!(me.poll_drain(cx))?;
        ready!(Pin::new(&mut me.inner).poll_flush(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

// === impl Connected ===

/// tonic reads the peer address and certificates through this; they are
/// the wrapped stream's.
impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// A real in-memory pipe that counts the writes reaching it.
    struct Counting {
        pipe: DuplexStream,
        writes: usize,
        flushes: usize,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.pipe).poll_write(cx, data);
            if matches!(r, Poll::Ready(Ok(_))) {
                self.writes += 1;
            }
            r
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Pin::new(&mut self.pipe).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.pipe).poll_shutdown(cx)
        }
    }

    fn pair(capacity: usize) -> (Coalesced<Counting>, DuplexStream) {
        let (a, b) = duplex(capacity);
        let c = Coalesced::new(Counting {
            pipe: a,
            writes: 0,
            flushes: 0,
        });
        (c, b)
    }

    #[tokio::test]
    async fn frames_written_before_a_flush_leave_as_one_write() {
        let (mut c, mut peer) = pair(1 << 20);
        c.write_all(b"HEADERS|").await.unwrap();
        let n = c
            .write_vectored(&[io::IoSlice::new(b"DATA"), io::IoSlice::new(b"|")])
            .await
            .unwrap();
        assert_eq!(n, 5, "a vectored write is taken whole");
        c.write_all(b"TRAILERS").await.unwrap();
        assert_eq!(c.get_ref().writes, 0, "nothing leaves before the flush");
        c.flush().await.unwrap();
        assert_eq!(c.get_ref().writes, 1);
        assert_eq!(c.get_ref().flushes, 1);
        let mut got = vec![0; 21];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"HEADERS|DATA|TRAILERS");
    }

    #[tokio::test]
    async fn a_flush_yields_one_turn_then_writes() {
        let (mut c, _peer) = pair(1 << 20);
        c.write_all(b"x").await.unwrap();
        let mut flush = tokio_test::task::spawn(poll_fn(|cx| Pin::new(&mut c).poll_flush(cx)));
        assert!(flush.poll().is_pending(), "first flush defers");
        assert!(flush.is_woken(), "and has asked to be polled again");
        assert!(matches!(flush.poll(), Poll::Ready(Ok(()))));
        drop(flush);
        assert_eq!(c.get_ref().writes, 1);
        // An empty buffer flushes at once, without a deferral.
        let mut flush = tokio_test::task::spawn(poll_fn(|cx| Pin::new(&mut c).poll_flush(cx)));
        assert!(matches!(flush.poll(), Poll::Ready(Ok(()))));
    }

    #[tokio::test]
    async fn large_and_slow_writes_arrive_whole_and_in_order() {
        // A pipe of 1 KiB: the inner stream accepts partial writes and
        // returns Pending while the peer has not read.
        let (mut c, mut peer) = pair(1024);
        let small: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let large: Vec<u8> = (0..(MAX_BUFFERED as u32 + 5000))
            .map(|i| (i % 241) as u8)
            .collect();
        let mut want = small.clone();
        want.extend_from_slice(&large);
        want.extend_from_slice(&small);
        let total = want.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; total];
            peer.read_exact(&mut got).await.unwrap();
            got
        });
        c.write_all(&small).await.unwrap();
        c.write_all(&large).await.unwrap();
        c.write_all(&small).await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), want);
        assert!(c.buf.is_empty() && c.buf.capacity() <= MAX_BUFFERED);
    }

    #[tokio::test]
    async fn debug_shows_the_count_not_the_buffered_plaintext() {
        let (c, _peer) = duplex(64);
        let mut c = Coalesced::new(c);
        c.write_all(b"jwt_svid=eyJhbGciOiJFUzI1NiJ9.SECRET")
            .await
            .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("SECRET") && !shown.contains("eyJ"),
            "{shown}"
        );
        assert!(
            !shown.contains("101, 121, 74"),
            "no byte list either: {shown}"
        );
        assert!(shown.contains("buffered: 36"), "{shown}");
    }

    #[tokio::test]
    async fn a_write_to_a_closed_peer_fails_at_the_flush() {
        let (mut c, peer) = pair(64);
        drop(peer);
        c.write_all(b"gone").await.unwrap();
        assert!(c.flush().await.is_err());
    }
}
