//! The `serve` binary as an operator runs it: secrets and presented credentials never reach
//! its log, whatever the log level, and a database password stays out of error messages.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

const BINARY: &str = env!("CARGO_BIN_EXE_llm-meter-sidecar");

fn unique(label: &str) -> String {
    format!("{label}-{:016x}", rand::random::<u64>())
}

/// A running `serve` whose stderr is collected.
struct Served {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl Served {
    fn start(command: &mut Command) -> Served {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the sidecar binary");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listen_address(&line) {
                    let _ = addr_tx.send(addr);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("no listen line; log:\n{}", log.lock().unwrap());
            }
        };
        Served {
            child,
            log,
            reader: Some(reader),
            addr,
        }
    }

    /// SIGTERM, wait, and the whole log.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "serve ignored SIGTERM");
            thread::sleep(Duration::from_millis(50));
        }
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let log = self.log.lock().unwrap().clone();
        log
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `listen=127.0.0.1:40123` from the text log line.
fn listen_address(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listen=")? + "listen=".len()..];
    rest.split_whitespace()
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

fn temp_path(label: &str) -> PathBuf {
    std::env::temp_dir().join(unique(label))
}

#[tokio::test]
async fn secrets_and_presented_credentials_never_reach_the_log() {
    let shared_secret = unique("shared-secret-value");
    let admin_token = unique("admin-token-value");
    let wrong_token = unique("wrong-token-value");
    let wrong_secret = unique("wrong-secret-value");
    let token_file = temp_path("meter-token");
    std::fs::write(&token_file, format!("{admin_token}\n")).unwrap();
    let database = temp_path("meter-log-test.db");
    let served = Served::start(
        Command::new(BINARY)
            .arg("serve")
            .env("METER_SHARED_SECRET", &shared_secret)
            .env("METER_ADMIN_TOKEN_FILE", &token_file)
            .env("DATABASE_URL", format!("sqlite://{}", database.display()))
            .env("METER_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "trace")
            .env_remove("METER_ADMIN_TOKEN")
            .env_remove("METER_SHARED_SECRET_FILE"),
    );
    assert!(served.addr.ip().is_loopback());
    let base = format!("http://{}", served.addr);
    let client = reqwest::Client::new();
    let admin_url = format!("{base}/admin/v1/providers");
    let authorize_url = format!("{base}{}", llm_meter_protocol::PATH_AUTHORIZE);
    let secret_header = llm_meter_protocol::HEADER_SECRET;

    let statuses = [
        // 401 / 403 on the admin API, including the shared secret offered as a token.
        client.get(&admin_url).send().await.unwrap().status(),
        client
            .get(&admin_url)
            .bearer_auth(&wrong_token)
            .send()
            .await
            .unwrap()
            .status(),
        client
            .get(&admin_url)
            .bearer_auth(&shared_secret)
            .send()
            .await
            .unwrap()
            .status(),
        client
            .get(&admin_url)
            .header("authorization", format!("Basic {wrong_token}"))
            .send()
            .await
            .unwrap()
            .status(),
        // 401 / 403 on the internal API, including the admin token offered as the secret.
        client
            .post(&authorize_url)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        client
            .post(&authorize_url)
            .header(secret_header, &wrong_secret)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        client
            .post(&authorize_url)
            .header(secret_header, &admin_token)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        // Accepted credentials, with a bad body and a good one.
        client
            .post(&authorize_url)
            .header(secret_header, &shared_secret)
            .json(&json!({"request_id": ""}))
            .send()
            .await
            .unwrap()
            .status(),
        client
            .post(&admin_url)
            .bearer_auth(&admin_token)
            .json(&json!({"code": "openai", "name": "OpenAI"}))
            .send()
            .await
            .unwrap()
            .status(),
    ];
    let codes: Vec<u16> = statuses.iter().map(|s| s.as_u16()).collect();
    assert_eq!(codes, [401, 403, 403, 401, 401, 403, 403, 422, 201]);

    let log = served.stop();
    let _ = std::fs::remove_file(&token_file);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", database.display()));
    }
    assert!(
        log.contains("/admin/v1/providers"),
        "the trace log saw the requests (else this test proves nothing):\n{log}"
    );
    for (name, value) in [
        ("shared secret", &shared_secret),
        ("admin token", &admin_token),
        ("wrong token", &wrong_token),
        ("wrong secret", &wrong_secret),
    ] {
        assert!(
            !log.contains(value.as_str()),
            "the {name} is in the log:\n{log}"
        );
    }
}

#[test]
fn database_password_stays_out_of_startup_errors() {
    // Something that accepts and hangs up: the PostgreSQL handshake fails at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hang_up = thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            drop(stream);
        }
    });
    let password = unique("db-password");
    let output = Command::new(BINARY)
        .arg("serve")
        .env("METER_SHARED_SECRET", unique("s"))
        .env("METER_ADMIN_TOKEN", unique("t"))
        .env(
            "DATABASE_URL",
            format!("postgres://meter:{password}@127.0.0.1:{port}/ledger"),
        )
        .env("METER_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let _ = hang_up.join();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{printed}");
    assert!(!printed.contains(&password), "{printed}");
    assert!(
        printed.contains(&format!("postgres://meter:***@127.0.0.1:{port}/ledger")),
        "the error names the database, password masked: {printed}"
    );
}

#[test]
fn serve_without_secrets_refuses_to_start() {
    let output = Command::new(BINARY)
        .arg("serve")
        .env_remove("METER_SHARED_SECRET")
        .env_remove("METER_SHARED_SECRET_FILE")
        .env_remove("METER_ADMIN_TOKEN")
        .env_remove("METER_ADMIN_TOKEN_FILE")
        .env("METER_LISTEN", "127.0.0.1:0")
        .env("DATABASE_URL", "sqlite::memory:")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("METER_SHARED_SECRET"), "{stderr}");
}
