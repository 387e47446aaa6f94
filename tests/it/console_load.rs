//! The console under load (issue #24, item 13): its download is bounded in
//! memory and stops when its client goes; its reads cannot take the
//! connections the consumers decide claims with.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use coupon_platform::kafka::Publisher;
use coupon_schemas::BlacklistChanged;
use couponctl::app::Role;

use crate::harness::{eventually, release, TestEnv};

const ADMIN: &str = "admin-secret";
/// Records in the log, and the size of each one's reason.
const RECORDS: usize = 600;
const REASON: usize = 100_000;

/// Fills the blacklist topic with `RECORDS` changes of `REASON` bytes each:
/// a download of some 60 MB.
async fn fill_log(env: &TestEnv) {
    let publisher = Publisher::new(&env.kafka, "test-filler").unwrap();
    let reason = "x".repeat(REASON);
    let events: Vec<(String, BlacklistChanged)> = (0..RECORDS)
        .map(|i| {
            let user = format!("big-{i}");
            let event = BlacklistChanged {
                envelope: Some(publisher.envelope::<BlacklistChanged>("")),
                user_id: user.clone(),
                blacklisted: true,
                reason: reason.clone(),
                source: "manual".into(),
                ..Default::default()
            };
            (user, event)
        })
        .collect();
    for chunk in events.chunks(50) {
        publisher
            .send_all(&env.topics.blacklist(), chunk)
            .await
            .expect("publish");
    }
}

/// A client that asks for the download and reads its head only.
async fn start_download(app: &crate::harness::App) -> (tokio::net::TcpStream, Vec<u8>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small window: what the client does not read stays at the server.
    socket.set_recv_buffer_size(32 * 1024).unwrap();
    let mut stream = socket.connect(app.http.unwrap()).await.unwrap();
    let request = format!(
        "GET /api/v1/analytics/export HTTP/1.1\r\nHost: test\r\n\
         Authorization: Bearer {ADMIN}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read.windows(4).any(|w| w == b"\r\n\r\n") {
        assert!(Instant::now() < deadline, "no answer head");
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head");
        read.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&read).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "a streamed body: {head}"
    );
    (stream, read)
}

/// The body of a chunked answer (`raw` from its first byte on).
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let start = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = &raw[start..];
    let mut body = Vec::new();
    loop {
        let line = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).unwrap(), 16).unwrap();
        rest = &rest[line + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_holds_little_while_its_client_reads_slowly_and_stops_when_it_leaves() {
    let env = TestEnv::new().await;
    fill_log(&env).await;
    let app = env.start(&[Role::Gateway], |_| {}).await;
    let stats = app.running.as_ref().unwrap().exports.clone().unwrap();
    let total = (RECORDS * REASON) as u64;

    // A client that reads nothing past the head: the exporter waits with
    // a few chunks given, not the whole download.
    let (mut stream, mut raw) = start_download(&app).await;
    eventually(
        "the exporter waits for its client",
        Duration::from_secs(60),
        || async { stats.waiting.load(Relaxed) > 0 },
    )
    .await;
    let produced = stats.produced_bytes.load(Relaxed);
    assert!(
        produced < total / 4,
        "{produced} of {total} bytes produced for a client that read nothing"
    );
    // Read then, slowly at first: the whole download arrives.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let body = dechunk(&raw);
    let lines = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(lines, RECORDS, "every record once");
    assert!(body.len() as u64 > total);
    eventually("the export ended", Duration::from_secs(10), || async {
        stats.running.load(Relaxed) == 0
    })
    .await;

    // A client that leaves after the head: the export stops (its consumer
    // closed) long before the end of the log.
    let before = stats.produced_bytes.load(Relaxed);
    let (stream, _) = start_download(&app).await;
    eventually(
        "the export is under way",
        Duration::from_secs(60),
        || async { stats.waiting.load(Relaxed) > 0 },
    )
    .await;
    drop(stream);
    eventually(
        "the export stopped with its client",
        Duration::from_secs(30),
        || async { stats.running.load(Relaxed) == 0 },
    )
    .await;
    let produced = stats.produced_bytes.load(Relaxed) - before;
    assert!(
        produced < total / 4,
        "{produced} of {total} bytes produced for a client that left"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_reads_cannot_take_the_connections_claims_are_decided_with() {
    let env = TestEnv::new().await;
    let app = env
        .start(&[Role::Gateway, Role::Coupons, Role::Claims], |c| {
            c.gateway.reply_timeout = Duration::from_secs(10);
        })
        .await;
    release(&env, "Books", 20).await;
    // The console's claims chart reads `coupon_history`, which claims do
    // not touch (no history sink runs here); a lock held on it makes every
    // such read wait, holding its connection.
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE coupon_history IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let http = TestEnv::http_client();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = Vec::new();
    for _ in 0..40 {
        let (http, url, stop) = (
            http.clone(),
            app.url("/api/v1/analytics/claims"),
            stop.clone(),
        );
        readers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let request = http.get(&url).bearer_auth(ADMIN).send();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = request => {}
                }
            }
        }));
    }
    // The console's reads wait on the lock, as many as their pool allows.
    eventually(
        "console reads waiting on the lock",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            waiting >= 4
        },
    )
    .await;
    // Claims are still decided.
    let started = Instant::now();
    let answers: Vec<u16> = stream::iter(0..10)
        .map(|i| {
            let (http, url) = (
                http.clone(),
                app.url(&format!("/api/v1/coupon?id=reader-{i}")),
            );
            async move { http.get(url).send().await.unwrap().status().as_u16() }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    let took = started.elapsed();
    stop.cancel();
    for reader in readers {
        let _ = reader.await;
    }
    lock.rollback().await.unwrap();
    assert_eq!(
        answers,
        vec![200; 10],
        "claims while the console's reads hang (after {took:?})"
    );
    app.stop().await;
}
