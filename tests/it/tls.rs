//! TLS (and SASL) to every backend: Postgres with `sslmode=verify-full`,
//! Redis over `rediss://`, Kafka over `SASL_SSL` (PLAIN) and `SSL`, against
//! throwaway servers that `tests/tls/servers.sh` starts with certificates it
//! makes (a CA of its own), next to the shared ones. Plain connections are
//! refused by all three, so a working claim proves every client spoke TLS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{free_port, Child, TestEnv};

/// The servers of one test, stopped (and their directory removed) on drop.
struct TlsServers {
    dir: PathBuf,
    ports: Vec<(&'static str, u16)>,
}

impl TlsServers {
    fn port(&self, name: &str) -> u16 {
        self.ports
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .expect("port")
    }

    fn ca(&self) -> String {
        self.dir.join("ca.crt").display().to_string()
    }

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/servers.sh")
    }

    /// Ports below the ephemeral range (other tests' clients use those),
    /// each free when picked.
    fn pick_ports() -> Vec<(&'static str, u16)> {
        let names = [
            "TLS_PG_PORT",
            "TLS_REDIS_PORT",
            "TLS_KAFKA_SASL_PORT",
            "TLS_KAFKA_SSL_PORT",
            "TLS_KAFKA_INTERNAL_PORT",
            "TLS_KAFKA_CONTROLLER_PORT",
        ];
        let mut ports = Vec::new();
        while ports.len() < names.len() {
            let port: u16 = rand::random_range(20_000..32_000);
            let taken = ports.iter().any(|(_, p)| *p == port);
            if !taken && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                ports.push((names[ports.len()], port));
            }
        }
        ports
    }

    fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("coupon-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("tls dir");
        let servers = Self {
            dir,
            ports: Self::pick_ports(),
        };
        let output = Command::new("bash")
            .arg(Self::script())
            .arg("start")
            .arg(&servers.dir)
            .envs(servers.ports.iter().map(|(k, v)| (*k, v.to_string())))
            .output()
            .expect("run tests/tls/servers.sh");
        assert!(
            output.status.success(),
            "starting the TLS servers failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        servers
    }
}

impl Drop for TlsServers {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Self::script())
            .arg("stop")
            .arg(&self.dir)
            .envs(self.ports.iter().map(|(k, v)| (*k, v.to_string())))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_over_tls_with_sasl_to_kafka() {
    let env = TestEnv::new().await;
    let servers = tokio::task::spawn_blocking(TlsServers::start)
        .await
        .expect("start TLS servers");
    let ca = servers.ca();
    let database_url = format!(
        "postgres://postgres@127.0.0.1:{}/coupons?sslmode=verify-full&sslrootcert={ca}",
        servers.port("TLS_PG_PORT")
    );
    let redis_url = format!("rediss://127.0.0.1:{}", servers.port("TLS_REDIS_PORT"));
    let tls_env = |command: &mut Command| {
        command
            .env("DATABASE_URL", &database_url)
            .env("REDIS_URL", &redis_url)
            // Redis (native-tls: OpenSSL) trusts the CA this way.
            .env("SSL_CERT_FILE", &ca);
    };

    // SSL: the topics over the SSL listener.
    let mut topics = env.couponctl();
    tls_env(&mut topics);
    let output = topics
        .args(["topics"])
        .env(
            "KAFKA_BROKERS",
            format!("127.0.0.1:{}", servers.port("TLS_KAFKA_SSL_PORT")),
        )
        .env(
            "KAFKA_EXTRA",
            format!("security.protocol=SSL,ssl.ca.location={ca}"),
        )
        .output()
        .expect("couponctl topics");
    assert!(
        output.status.success(),
        "topics over SSL: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains(".claims"));

    // Without the CA, Postgres's certificate is not trusted.
    let mut untrusted = env.couponctl();
    let output = untrusted
        .args(["migrate"])
        .env(
            "DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{}/coupons?sslmode=verify-full",
                servers.port("TLS_PG_PORT")
            ),
        )
        .output()
        .expect("couponctl migrate");
    assert!(
        !output.status.success(),
        "an untrusted certificate was accepted"
    );

    // SASL_SSL: the whole system, a release, a claim and a purchase.
    let port = free_port();
    let sasl_brokers = format!("127.0.0.1:{}", servers.port("TLS_KAFKA_SASL_PORT"));
    let sasl_extra = format!(
        "security.protocol=SASL_SSL,sasl.mechanism=PLAIN,sasl.username=coupon,\
         sasl.password=coupon-secret,ssl.ca.location={ca}"
    );
    let mut child = Child::spawn_with(&env, &["run"], port, "tls", |command| {
        tls_env(command);
        command
            .env("KAFKA_BROKERS", &sasl_brokers)
            .env("KAFKA_EXTRA", &sasl_extra)
            .env("REPLY_TIMEOUT", "20s");
    });
    let base = format!("http://127.0.0.1:{port}");
    child.wait_healthy(&base, Duration::from_secs(120)).await;
    let http = TestEnv::http_client();
    let health: Value = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    let released = http
        .post(format!("{base}/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .json(&json!({"id": "e-tls", "category": "Tls", "count": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 202);
    // Until the projector has stored the release (sold out meanwhile).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let granted: Value = loop {
        let response = http
            .get(format!("{base}/api/v1/coupon?id=tls-user"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break response.json().await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no grant over TLS: {} {:?}",
            response.status(),
            response.text().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let code = granted["coupon_code"].as_str().expect("code").to_owned();
    let bought = http
        .post(format!("{base}/api/v1/purchase"))
        .json(&json!({"user_id": "tls-user", "coupon_code": code, "order_id": "tls-order"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bought.status(), 200, "{:?}", bought.text().await);

    // The server saw TLS connections only (plain ones are refused by
    // pg_hba.conf; this shows the pool's own connections use TLS).
    let pool = coupon_platform::db::connect(&database_url, 1)
        .await
        .expect("connect over TLS");
    let plain: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
          WHERE a.datname = 'coupons' AND NOT s.ssl",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(plain, 0);
    let redeemed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM coupons WHERE status = 'redeemed'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(redeemed, 1);
    pool.close().await;
    child.kill_9().await;
    drop(servers);
}
