//! A TCP proxy that can cut the path to its upstream: the tests' stand-in
//! for a database (or any server) that goes away and comes back. While cut,
//! every open connection is closed and every new one is closed as soon as
//! it is accepted, which a client sees as a lost or refused connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

struct Shared {
    cut: watch::Sender<bool>,
    refused: AtomicU64,
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
                tokio::spawn(pipe(inbound, upstream.clone(), s.cut.subscribe()));
            }
        });
        Ok(Self {
            port,
            shared,
            _stop: stop,
        })
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
}

async fn pipe(mut inbound: TcpStream, upstream: String, mut cut: watch::Receiver<bool>) {
    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.wait_for(|c| *c) => {}
    }
}
