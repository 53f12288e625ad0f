//! The admin audit trail: who did what, to what, when — written in the same transaction as
//! the action itself.

use crate::storage::Conn;
use serde::Serialize;

use crate::storage::{now_ms, Dialect};

/// Column limit of `admin_audit.detail`.
const DETAIL_MAX_CHARS: usize = 4000;

/// Who performs an admin action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor(pub String);

impl Actor {
    pub fn system() -> Self {
        Actor("system".to_string())
    }
}

/// Append one audit row on `conn` (inside the caller's transaction).
pub async fn record(
    conn: &mut Conn,
    dialect: Dialect,
    actor: &Actor,
    action: &str,
    target_type: &str,
    target_id: Option<&str>,
    detail: &impl Serialize,
) -> Result<(), sqlx::Error> {
    let detail =
        serde_json::to_string(detail).unwrap_or_else(|err| format!("unserialisable detail: {err}"));
    let sql = dialect.sql(
        "INSERT INTO admin_audit (actor, action, target_type, target_id, detail, created_at) VALUES (?, ?, ?, ?, ?, ?)",
    );
    sqlx::query(&sql)
        .bind(actor.0.clone())
        .bind(action.to_string())
        .bind(target_type.to_string())
        .bind(target_id.map(str::to_string))
        .bind(truncate(&detail, DETAIL_MAX_CHARS))
        .bind(now_ms())
        .execute(conn)
        .await?;
    Ok(())
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => text[..cut].to_string(),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(super::truncate("元元元", 2), "元元");
        assert_eq!(super::truncate("abc", 10), "abc");
    }
}
