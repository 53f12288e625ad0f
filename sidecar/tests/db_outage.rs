//! Database outages on real engines: a private PostgreSQL cluster and a private MariaDB
//! server (started here on free ports and stopped mid-test; the shared servers on 5432/3306
//! are never touched), and a SQLite file locked by another connection.
//!
//! While the database is away, authorize answers a 503 problem (so the filter applies its
//! failure mode) and finalize items answer `retry`; once it is back, the same settlements
//! land exactly once.
//!
//! A missing engine binary skips its test with a note, except under `CI=true` where it fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use llm_meter_protocol::{HEADER_SECRET, PATH_AUTHORIZE, PATH_FINALIZE_BATCH, PATH_SETTLE};
use llm_meter_sidecar::api::problem::database_unavailable;
use llm_meter_sidecar::api::{router, AppState, AuthSecrets};
use llm_meter_sidecar::config::Secret;
use llm_meter_sidecar::ledger::{Ledger, LedgerConfig};
use llm_meter_sidecar::metrics::Metrics;
use llm_meter_sidecar::storage::{Db, DbOptions};
use serde_json::{json, Value};
use sqlx::{Connection, Executor};
use tower::ServiceExt;

const SECRET: &str = "outage-shared-secret";
const ADMIN: &str = "outage-admin-token";
const USER: &str = "ola";

/// Something that takes the database away and gives it back.
trait Outage {
    async fn begin(&mut self);
    async fn end(&mut self);
}

#[tokio::test]
async fn postgres_outage_defers_settlements_without_doubling() {
    let Some(mut server) = PrivatePostgres::start() else {
        return;
    };
    let url = server.url();
    outage_scenario("postgres", &url, &mut server).await;
}

#[tokio::test]
async fn mariadb_outage_defers_settlements_without_doubling() {
    let Some(mut server) = PrivateMariaDb::start() else {
        return;
    };
    let url = server.create_database("meter").await;
    outage_scenario("mariadb", &url, &mut server).await;
}

#[tokio::test]
async fn sqlite_lock_defers_settlements_without_doubling() {
    let dir = TempDir::new("sqlite");
    let path = dir.path.join("ledger.db");
    let mut lock = SqliteLock {
        path: path.clone(),
        holder: None,
    };
    outage_scenario("sqlite", &format!("sqlite://{}", path.display()), &mut lock).await;
}

/// The scenario every engine runs.
async fn outage_scenario(engine: &str, url: &str, outage: &mut impl Outage) {
    let options = DbOptions {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(2),
        busy_timeout: Duration::from_millis(100),
    };
    let db = Db::connect_with(url, options).await.unwrap();
    db.migrate().await.unwrap();
    let app = App::new(db.clone());
    app.seed().await;
    for id in ["o-1", "o-2", "o-3"] {
        let (status, body) = app.internal(PATH_AUTHORIZE, authorize_body(id)).await;
        assert_eq!(status, StatusCode::OK, "{engine}: {body}");
        assert_eq!(body["decision"], "allow", "{engine}: {body}");
    }
    let batch = json!({"items": [
        settle_item("o-1", 50),
        settle_item("o-2", 20),
        {"op": "void", "request_id": "o-3", "reason": "client went away", "upstream_status": 499}
    ]});

    let mut open_connection = db.pool().acquire().await.unwrap();
    outage.begin().await;
    if engine != "sqlite" {
        // A connection the restart cut: its error must read as "unavailable", not internal.
        let cut = sqlx::query("SELECT 1")
            .execute(&mut *open_connection)
            .await
            .unwrap_err();
        assert!(database_unavailable(&cut), "{engine}: {cut:?}");
    }
    drop(open_connection);
    let started = Instant::now();
    let (status, content_type, body) = app
        .send(internal_request(PATH_AUTHORIZE, authorize_body("o-4")))
        .await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{engine}: authorize during the outage: {body}"
    );
    assert_eq!(content_type, "application/problem+json", "{engine}");
    assert_eq!(
        body["type"], "urn:llm-meter:problem:unavailable",
        "{engine}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{engine}: authorize took {:?} to give up",
        started.elapsed()
    );
    let (status, body) = app.internal(PATH_SETTLE, settle_request("o-1", 50)).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{engine}: settle during the outage: {body}"
    );
    let (status, body) = app.internal(PATH_FINALIZE_BATCH, batch.clone()).await;
    assert_eq!(status, StatusCode::OK, "{engine}: {body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{engine}: {body}");
    for (result, id) in results.iter().zip(["o-1", "o-2", "o-3"]) {
        assert_eq!(result["result"], "retry", "{engine}: {body}");
        assert_eq!(result["request_id"], id, "{engine}: {body}");
    }
    if engine != "sqlite" {
        // A locked SQLite file still reads; a stopped server does not.
        let (status, _, body) = app.send(get("/readyz", false)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{engine}: {body}");
        // Admin reads and writes say "unavailable" too, never "internal error".
        let quotas = format!("/admin/v1/users/{USER}/quotas");
        let provider = json!({"code": "deepseek", "name": "DeepSeek"});
        let answers = tokio::join!(
            app.send(get(&quotas, true)),
            app.send(get("/admin/v1/usage", true)),
            app.send(get("/admin/v1/providers", true)),
            app.send(get("/admin/v1/audit", true)),
            app.send(get(
                "/admin/v1/reports/cost?from=2025-01-01&to=2025-01-31",
                true
            )),
            app.send(admin_request("POST", "/admin/v1/providers", Some(provider))),
        );
        let answers = [
            answers.0, answers.1, answers.2, answers.3, answers.4, answers.5,
        ];
        for (status, content_type, body) in answers {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{engine}: {body}");
            assert_eq!(content_type, "application/problem+json", "{engine}");
        }
    }
    outage.end().await;

    // The outbox resends the same batch: everything lands, once.
    let body = app.finalize_until_done(engine, &batch).await;
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        statuses,
        ["settled", "settled", "voided"],
        "{engine}: {body}"
    );
    let (_, again) = app.internal(PATH_FINALIZE_BATCH, batch.clone()).await;
    let statuses: Vec<&str> = again["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        statuses,
        ["already_settled", "already_settled", "already_voided"],
        "{engine}: {again}"
    );
    // A replay with other figures is refused, on both paths.
    let (status, body) = app.internal(PATH_SETTLE, settle_request("o-1", 51)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{engine}: {body}");
    assert_eq!(body["type"], "urn:llm-meter:problem:conflict", "{engine}");
    let (_, body) = app
        .internal(
            PATH_FINALIZE_BATCH,
            json!({"items": [settle_item("o-2", 999)]}),
        )
        .await;
    assert_eq!(body["results"][0]["result"], "rejected", "{engine}: {body}");

    // The authorization refused during the outage left nothing behind.
    let (status, body) = app.internal(PATH_AUTHORIZE, authorize_body("o-4")).await;
    assert_eq!(
        (status, body["decision"].as_str()),
        (StatusCode::OK, Some("allow")),
        "{engine}: {body}"
    );
    let (status, _, quotas) = app
        .send(get(&format!("/admin/v1/users/{USER}/quotas"), true))
        .await;
    assert_eq!(status, StatusCode::OK, "{engine}: {quotas}");
    let text = &quotas["quotas"][0];
    assert_eq!(text["used"], 100 + 50 + 100 + 20, "{engine}: {quotas}");
    assert_eq!(text["held"], 200, "{engine}: only o-4 holds: {quotas}");
    let (status, _, usage) = app.send(get("/admin/v1/usage?user_id=ola", true)).await;
    assert_eq!(status, StatusCode::OK, "{engine}: {usage}");
    let mut ids: Vec<&str> = usage["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["request_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        ["o-1", "o-2", "o-3"],
        "{engine}: one record each: {usage}"
    );
    let (status, _, reconcile) = app
        .send(admin_request("POST", "/admin/v1/reconcile", None))
        .await;
    assert_eq!(status, StatusCode::OK, "{engine}: {reconcile}");
    assert_eq!(reconcile["clean"], true, "{engine}: {reconcile}");
    db.close().await;
}

// ---- the service under test ----

struct App {
    router: Router,
}

impl App {
    fn new(db: Db) -> App {
        let ledger = Ledger::new(
            db.clone(),
            LedgerConfig {
                timezone: chrono_tz::UTC,
                ..LedgerConfig::default()
            },
        );
        let state = AppState {
            db,
            ledger,
            auth: Arc::new(AuthSecrets {
                shared_secret: Secret::new(SECRET),
                admin_token: Secret::new(ADMIN),
            }),
            metrics: Arc::new(Metrics::new()),
            timezone: chrono_tz::UTC,
        };
        App {
            router: router(state),
        }
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, String, Value) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, content_type, body)
    }

    async fn internal(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let (status, _, body) = self.send(internal_request(path, body)).await;
        (status, body)
    }

    async fn admin(&self, method: &str, path: &str, body: Value) {
        let (status, _, answer) = self.send(admin_request(method, path, Some(body))).await;
        assert!(status.is_success(), "{method} {path}: {status} {answer}");
    }

    /// Provider `openai`, model `m1` priced per 1k tokens, 100000 text tokens for the user.
    async fn seed(&self) {
        self.admin(
            "POST",
            "/admin/v1/providers",
            json!({"code": "openai", "name": "OpenAI"}),
        )
        .await;
        self.admin(
            "POST",
            "/admin/v1/models",
            json!({"provider": "openai", "model": "m1"}),
        )
        .await;
        self.admin(
            "POST",
            "/admin/v1/prices",
            json!({"provider": "openai", "model": "m1", "items": [
            {"pricing_type": "input_token", "unit": "per_1k_tokens", "unit_price": "0.002"},
            {"pricing_type": "output_token", "unit": "per_1k_tokens", "unit_price": "0.006"}]}),
        )
        .await;
        self.admin(
            "POST",
            "/admin/v1/grants",
            json!({"user_id": USER, "quota_type": "text_token",
            "amount": 100000, "source_id": "outage-seed"}),
        )
        .await;
    }

    /// Resends `batch` while the pool reconnects, as the filter's outbox would.
    async fn finalize_until_done(&self, engine: &str, batch: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.internal(PATH_FINALIZE_BATCH, batch.clone()).await;
            assert_eq!(status, StatusCode::OK, "{engine}: {body}");
            let results = body["results"].as_array().unwrap();
            if results.iter().all(|r| r["result"] == "ok") {
                return body;
            }
            assert!(
                results.iter().all(|r| r["result"] != "rejected"),
                "{engine}: {body}"
            );
            assert!(
                Instant::now() < deadline,
                "{engine}: still retrying: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn authorize_body(id: &str) -> Value {
    json!({"request_id": id, "caller": {"user_id": USER}, "provider": "openai", "model": "m1",
        "estimated_input_tokens": 100, "max_output_tokens": 100})
}

fn settle_request(id: &str, output_tokens: u64) -> Value {
    json!({"request_id": id, "caller": {"user_id": USER}, "provider": "openai", "model": "m1",
        "outcome": "completed", "usage": {"input_tokens": 100, "output_tokens": output_tokens}})
}

fn settle_item(id: &str, output_tokens: u64) -> Value {
    let mut item = settle_request(id, output_tokens);
    item["op"] = json!("settle");
    item
}

fn internal_request(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header(HEADER_SECRET, SECRET)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn admin_request(method: &str, path: &str, body: Option<Value>) -> Request<Body> {
    let builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .header(header::CONTENT_TYPE, "application/json");
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    builder.body(body).unwrap()
}

fn get(path: &str, admin: bool) -> Request<Body> {
    if admin {
        return admin_request("GET", path, None);
    }
    Request::get(path).body(Body::empty()).unwrap()
}

// ---- private database servers ----

/// A directory under the system temp dir, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "llm-meter-outage-{label}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Skips a test whose engine is not installed, except under CI where that is a failure.
fn engine_missing(what: &str) {
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{what} is not installed (required under CI=true)");
    }
    eprintln!("SKIPPED: {what} is not installed");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A PostgreSQL cluster of its own: `initdb` in a temp dir, `pg_ctl` start/stop.
/// initdb refuses root, so as root the cluster runs as the `postgres` user.
struct PrivatePostgres {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    fn start() -> Option<PrivatePostgres> {
        let Some(bin) = postgres_bin_dir() else {
            engine_missing("PostgreSQL (initdb/pg_ctl under /usr/lib/postgresql/*/bin)");
            return None;
        };
        let dir = TempDir::new("pg");
        let as_postgres = is_root();
        if as_postgres {
            run(
                Command::new("chown").arg("postgres").arg(&dir.path),
                "chown the cluster dir",
            );
        }
        let server = PrivatePostgres {
            bin,
            dir,
            port: free_port(),
            as_postgres,
        };
        let data = server.data_dir();
        run(
            server
                .command("initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        );
        server.pg_ctl_start();
        Some(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path.join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path.display()
        );
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-o", &options, "-l"])
                .arg(self.dir.path.join("server.log"))
                .args(["-w", "start"])
                .stdout(Stdio::null()),
            "pg_ctl start",
        );
    }

    fn pg_ctl_stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Outage for PrivatePostgres {
    async fn begin(&mut self) {
        self.pg_ctl_stop();
    }

    async fn end(&mut self) {
        self.pg_ctl_start();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.pg_ctl_stop();
    }
}

fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// A MariaDB server of its own: `mariadb-install-db` in a temp dir, `mariadbd` started and
/// stopped (SIGTERM) on a free port.
struct PrivateMariaDb {
    server_bin: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl PrivateMariaDb {
    fn start() -> Option<PrivateMariaDb> {
        let (Some(install), Some(server_bin)) = (
            find_program(&["mariadb-install-db", "mysql_install_db"]),
            find_program(&["mariadbd", "mysqld"]),
        ) else {
            engine_missing("MariaDB (mariadb-install-db and mariadbd)");
            return None;
        };
        let dir = TempDir::new("mariadb");
        let mut install = Command::new(install);
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path.join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if is_root() {
            install.arg("--user=root");
        }
        run(&mut install, "mariadb-install-db");
        let mut server = PrivateMariaDb {
            server_bin,
            dir,
            port: free_port(),
            child: None,
        };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let mut command = Command::new(&self.server_bin);
        let path = &self.dir.path;
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", path.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", path.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", path.join("mysqld.pid").display()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
                "--innodb-flush-log-at-trx-commit=2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            command.arg("--user=root");
        }
        self.child = Some(command.spawn().expect("start mariadbd"));
        wait_for_port(self.port, "mariadbd");
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Creates `name` and returns its URL.
    async fn create_database(&self, name: &str) -> String {
        let admin = format!("mysql://root@127.0.0.1:{}/mysql", self.port);
        let mut conn = sqlx::MySqlConnection::connect(&admin).await.unwrap();
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let _ = conn.close().await;
        format!("mysql://root@127.0.0.1:{}/{name}", self.port)
    }
}

impl Outage for PrivateMariaDb {
    async fn begin(&mut self) {
        self.stop();
    }

    async fn end(&mut self) {
        self.spawn();
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from));
    names.iter().find_map(|name| {
        dirs.iter()
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// Another connection holding SQLite's write lock, as a long transaction of another
/// process (or a backup) would.
struct SqliteLock {
    path: PathBuf,
    holder: Option<sqlx::SqliteConnection>,
}

impl Outage for SqliteLock {
    async fn begin(&mut self) {
        let mut conn = sqlite_connection(&self.path).await;
        conn.execute("BEGIN EXCLUSIVE").await.unwrap();
        conn.execute("UPDATE ledger_accounts SET balance = balance WHERE 1 = 0")
            .await
            .unwrap();
        self.holder = Some(conn);
    }

    async fn end(&mut self) {
        if let Some(mut conn) = self.holder.take() {
            conn.execute("ROLLBACK").await.unwrap();
            let _ = conn.close().await;
        }
    }
}

async fn sqlite_connection(path: &Path) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}
