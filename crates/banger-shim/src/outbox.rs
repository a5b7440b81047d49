//! The shim's events on their way to containerd: forwarded by one task in the order they
//! happened, and counted until containerd has them, so that the shim's exit waits for them.
//!
//! Why not the crate's `RemotePublisher` alone: its queue is drained by a task nobody can wait
//! for, and containerd shuts a shim down right after the task's `Delete`, whose
//! `/tasks/delete` (and often the `/tasks/exit` before it) was still queued: the process
//! ended with them and containerd's clients never heard (the containerd test saw it, once in
//! a while). containerd's own shims wait for their publisher on the way out, at most 5 s;
//! this one does the same.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim_protos::api::Envelope;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::ttrpc::context;
use tokio::sync::{mpsc, watch};

/// How long one forward may take, and how many tries an event gets (containerd restarting
/// refuses a few), as the crate's publisher gives it.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
const TRIES: u32 = 5;
/// Most events waiting at once (the crate's publisher queues as many). A guest's agent
/// reports its OOM kills, and a hostile guest may report them endlessly: beyond this many
/// waiting, new events are dropped (and said so once per run of drops), so the shim's memory
/// stays bounded while containerd is slow or away.
const MAX_PENDING: usize = 1024;

#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Envelope>,
    /// The receiver, until [`Outbox::start`] gives it to the forwarding task.
    rx: Arc<Mutex<Option<mpsc::UnboundedReceiver<Envelope>>>>,
    /// Events published and not yet forwarded (or given up on).
    pending: Arc<watch::Sender<usize>>,
    /// Whether the last event was dropped (a full outbox), so a run of drops is logged once.
    dropping: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Outbox {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Outbox {
            tx,
            rx: Arc::new(Mutex::new(Some(rx))),
            pending: Arc::new(watch::Sender::new(0)),
            dropping: Default::default(),
        }
    }
}

impl Outbox {
    /// Forwards what is and will be published to containerd's TTRPC socket at `address`.
    /// Only the first call starts anything.
    pub fn start(&self, address: String) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let pending = self.pending.clone();
        tokio::spawn(async move {
            let mut client: Option<EventsClient> = None;
            while let Some(envelope) = rx.recv().await {
                let topic = envelope.topic.clone();
                let mut req = ForwardRequest::new();
                req.set_envelope(envelope);
                let mut last = String::new();
                let mut sent = false;
                for attempt in 0..TRIES {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                    }
                    if client.is_none() {
                        match connect(&address).await {
                            Ok(fd) => client = Some(EventsClient::new(Client::new(fd))),
                            Err(e) => {
                                last = e;
                                continue;
                            }
                        }
                    }
                    let c = client.as_ref().expect("connected above");
                    let ctx = context::with_timeout(FORWARD_TIMEOUT.as_nanos() as i64);
                    match c.forward(ctx, &req).await {
                        Ok(_) => {
                            sent = true;
                            break;
                        }
                        Err(e) => {
                            last = e.to_string();
                            client = None;
                        }
                    }
                }
                if !sent {
                    log::warn!("cannot publish {topic} after {TRIES} tries: {last}");
                }
                pending.send_modify(|n| *n = n.saturating_sub(1));
            }
        });
    }

    /// Queues an event for containerd; it goes after every event published before it.
    pub fn publish(&self, namespace: &str, topic: &str, event: Box<dyn MessageDyn>) {
        let mut envelope = Envelope::new();
        envelope.topic = topic.to_owned();
        envelope.namespace = namespace.to_owned();
        use containerd_shim::util::{convert_to_any, timestamp};
        match (timestamp(), convert_to_any(event)) {
            (Ok(at), Ok(any)) => {
                envelope.timestamp = MessageField::some(at);
                envelope.event = MessageField::some(any);
            }
            (Err(e), _) | (_, Err(e)) => return log::warn!("cannot encode {topic}: {e}"),
        }
        let queued = self.pending.send_if_modified(|n| {
            let room = *n < MAX_PENDING;
            if room {
                *n += 1;
            }
            room
        });
        use std::sync::atomic::Ordering;
        if !queued {
            if !self.dropping.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "{MAX_PENDING} events wait for containerd: dropping {topic} and those after it"
                );
            }
            return;
        }
        self.dropping.store(false, Ordering::Relaxed);
        if self.tx.send(envelope).is_err() {
            self.pending.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// Returns once every event published so far has gone (or failed its tries), or after
    /// `within`; true if they all went.
    pub async fn drained(&self, within: Duration) -> bool {
        let mut rx = self.pending.subscribe();
        tokio::time::timeout(within, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn connect(address: &str) -> Result<RawFd, String> {
    let address = address.to_owned();
    tokio::task::spawn_blocking(move || containerd_shim::util::connect(&address))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot connect to containerd: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use containerd_shim_protos::api::Empty;
    use containerd_shim_protos::events::task::TaskDelete;
    use containerd_shim_protos::shim_async::{create_events, Events};
    use containerd_shim_protos::ttrpc::asynchronous::Server;
    use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
    use std::os::fd::IntoRawFd;

    /// containerd's events service, slow to take each event.
    struct Slow(mpsc::UnboundedSender<(String, String)>);

    #[async_trait]
    impl Events for Slow {
        async fn forward(
            &self,
            _ctx: &TtrpcContext,
            req: ForwardRequest,
        ) -> containerd_shim_protos::ttrpc::Result<Empty> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let e = req.envelope();
            let _ = self.0.send((e.topic.clone(), e.event.type_url.clone()));
            Ok(Empty::new())
        }
    }

    #[tokio::test]
    async fn the_shim_waits_for_its_last_events_in_order_and_only_so_long() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock.ttrpc");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let (tx, mut heard) = mpsc::unbounded_channel();
        let mut server = Server::new()
            .set_domain_unix()
            .add_listener(listener.into_raw_fd())
            .unwrap()
            .register_service(create_events(Arc::new(Box::new(Slow(tx)))));
        server.start().await.unwrap();

        let outbox = Outbox::default();
        // Published before the task service (and its forwarding) starts: kept.
        outbox.publish("default", "/tasks/exit", Box::new(TaskDelete::new()));
        outbox.start(socket.to_str().unwrap().to_owned());
        outbox.start("/nowhere".into());
        outbox.publish("default", "/tasks/delete", Box::new(TaskDelete::new()));
        assert!(outbox.drained(Duration::from_secs(10)).await);
        let mut got = Vec::new();
        while let Ok(e) = heard.try_recv() {
            got.push(e);
        }
        assert_eq!(
            got,
            [
                ("/tasks/exit".into(), "containerd.events.TaskDelete".into()),
                (
                    "/tasks/delete".into(),
                    "containerd.events.TaskDelete".into()
                ),
            ]
        );

        // containerd gone: the exit waits no longer than it is told to.
        server.shutdown().await.unwrap();
        drop(server);
        let _ = std::fs::remove_file(&socket);
        outbox.publish("default", "/tasks/oom", Box::new(TaskDelete::new()));
        assert!(!outbox.drained(Duration::from_millis(100)).await);
        assert!(outbox.drained(Duration::from_secs(30)).await, "given up on");

        // A guest that reports OOM kills endlessly while containerd is away: no more than
        // MAX_PENDING wait; the rest are dropped.
        let flood = 3 * MAX_PENDING;
        for _ in 0..flood {
            outbox.publish("default", "/tasks/oom", Box::new(TaskDelete::new()));
        }
        let waiting = *outbox.pending.borrow();
        assert!(
            (MAX_PENDING - 1..=MAX_PENDING).contains(&waiting),
            "{waiting} of {flood} wait"
        );
        println!("outbox flood: {flood} published, {waiting} kept, the rest dropped");
    }
}
