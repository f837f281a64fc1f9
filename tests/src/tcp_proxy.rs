//! A TCP proxy that can cut the path to its upstream: the tests' stand-in
//! for a database (or any server) that goes away and comes back. While cut,
//! every open connection is closed and every new one is closed as soon as
//! it is accepted, which a client sees as a lost or refused connection.
//! It can also lose one answer: the server gets a request and acts on it,
//! and the connection closes before its answer reaches the client (a commit
//! whose answer was lost).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

struct Shared {
    cut: watch::Sender<bool>,
    refused: AtomicU64,
    /// Bytes whose sending arms the loss of the sender's next answer.
    lose_after: Mutex<Option<Vec<u8>>>,
    /// Whether losing the answer also cuts the path (as [`TcpCut::cut`]).
    cut_after_loss: AtomicBool,
    /// Whether the armed bytes themselves are lost (never delivered), not
    /// their answer.
    lose_request: AtomicBool,
    lost: AtomicU64,
}

impl Shared {
    /// Counts a loss, and cuts the path if armed to.
    fn lose(&self) {
        if self.cut_after_loss.load(Ordering::SeqCst) {
            self.cut.send_replace(true);
        }
        self.lost.fetch_add(1, Ordering::SeqCst);
    }

    /// True (once) when `sent` holds the armed bytes.
    fn takes_marker(&self, sent: &[u8]) -> bool {
        let Ok(mut armed) = self.lose_after.lock() else {
            return false;
        };
        let found = armed
            .as_deref()
            .is_some_and(|m| !m.is_empty() && sent.windows(m.len()).any(|w| w == m));
        if found {
            *armed = None;
        }
        found
    }
}

/// A running proxy.
pub struct TcpCut {
    port: u16,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl TcpCut {
    /// Starts a proxy to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            cut: watch::Sender::new(false),
            refused: AtomicU64::new(0),
            lose_after: Mutex::new(None),
            cut_after_loss: AtomicBool::new(false),
            lose_request: AtomicBool::new(false),
            lost: AtomicU64::new(0),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let upstream = upstream.to_owned();
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(_) => continue,
                    },
                };
                if *s.cut.borrow() {
                    s.refused.fetch_add(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                tokio::spawn(pipe(inbound, upstream.clone(), s.clone()));
            }
        });
        Ok(Self {
            port,
            shared,
            _stop: stop,
        })
    }

    /// Starts a proxy to the server `url` names (`postgres://`,
    /// `redis://`, ...; `default_port` when it names none); route the
    /// service's URL through it with [`route`](Self::route).
    pub async fn before(url: &str, default_port: u16) -> anyhow::Result<Self> {
        let u = reqwest::Url::parse(url)?;
        let host = u
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("{url} names no host"))?;
        Self::start(&format!("{host}:{}", u.port().unwrap_or(default_port))).await
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `url` (a URL whose authority is the upstream) pointed at the proxy.
    pub fn route(&self, url: &str) -> anyhow::Result<String> {
        let mut u = reqwest::Url::parse(url)?;
        u.set_host(Some("127.0.0.1"))?;
        u.set_port(Some(self.port))
            .map_err(|_| anyhow::anyhow!("{url} cannot take a port"))?;
        Ok(u.to_string())
    }

    /// Closes every open connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.shared.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.send_replace(false);
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Arms the loss of one answer: the first connection to send `marker`
    /// (within one read) has it delivered, and is closed, both ways, when
    /// the server's answer comes, which the client never gets.
    pub fn lose_answer_after(&self, marker: &[u8]) {
        self.arm(marker, false, false);
    }

    /// As [`lose_answer_after`](Self::lose_answer_after), and the path is
    /// then cut until [`restore`](Self::restore): the client cannot learn
    /// what became of its request for as long.
    pub fn lose_answer_then_cut(&self, marker: &[u8]) {
        self.arm(marker, true, false);
    }

    /// Arms the loss of one request: the first connection to send `marker`
    /// (within one read) has those bytes dropped, never delivered, and is
    /// closed both ways; the path is then cut until
    /// [`restore`](Self::restore). To the client it looks like a lost
    /// answer, but the server never saw the request.
    pub fn lose_request_then_cut(&self, marker: &[u8]) {
        self.arm(marker, true, true);
    }

    fn arm(&self, marker: &[u8], then_cut: bool, request: bool) {
        self.shared.cut_after_loss.store(then_cut, Ordering::SeqCst);
        self.shared.lose_request.store(request, Ordering::SeqCst);
        if let Ok(mut armed) = self.shared.lose_after.lock() {
            *armed = Some(marker.to_vec());
        }
    }

    /// Answers (or requests) lost so far.
    pub fn answers_lost(&self) -> u64 {
        self.shared.lost.load(Ordering::SeqCst)
    }
}

async fn pipe(inbound: TcpStream, upstream: String, shared: Arc<Shared>) {
    let mut cut = shared.cut.subscribe();
    let Ok(outbound) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    // Set once the armed bytes went out: the server's answer to them
    // cannot have been read before.
    let marked = AtomicBool::new(false);
    let requests = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let hit = shared.takes_marker(&buf[..n]);
            if hit && shared.lose_request.load(Ordering::SeqCst) {
                shared.lose();
                return;
            }
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
            if hit {
                marked.store(true, Ordering::SeqCst);
            }
        }
    };
    let answers = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if marked.load(Ordering::SeqCst) {
                shared.lose();
                return;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever way ends first closes both connections (the clients here,
    // database drivers, close both ways at once).
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
        _ = cut.wait_for(|c| *c) => {}
    }
}
