//! The session, the keyspace and the tables: what is set up before the
//! first write.

use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;

use super::{check_keyspace, CassandraError, CassandraSettings};

/// A session to the cluster with the settings' nodes, consistency,
/// timeouts, credentials and TLS.
pub(super) async fn open_session(settings: &CassandraSettings) -> Result<Session, CassandraError> {
    check_keyspace(&settings.keyspace).map_err(CassandraError::Config)?;
    if settings.nodes.is_empty() {
        return Err(CassandraError::Config("CASSANDRA_NODES is empty".into()));
    }
    let mut builder = SessionBuilder::new()
        .known_nodes(&settings.nodes)
        .connection_timeout(settings.request_timeout)
        .default_execution_profile_handle(
            scylla::client::execution_profile::ExecutionProfile::builder()
                .consistency(settings.consistency)
                .request_timeout(Some(settings.request_timeout))
                .build()
                .into_handle(),
        );
    if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
        builder = builder.user(user, password);
    }
    if let Some(ca) = &settings.tls_ca {
        builder = builder.tls_context(Some(tls_context(ca)?));
    }
    builder
        .build()
        .await
        .map_err(|source| CassandraError::Connect {
            nodes: settings.nodes.join(","),
            source: Box::new(source),
        })
}

/// The keyspace (when missing, with `replication`) and the three tables.
pub(super) async fn create_schema(
    session: &Session,
    keyspace: &str,
    replication: &str,
) -> Result<(), CassandraError> {
    let columns = "occurred_at timestamp, event_id uuid, item int, coupon_code text, user_id text, kind text, detail text";
    let clustering = "WITH CLUSTERING ORDER BY (occurred_at ASC, event_id ASC, item ASC)";
    let ddl = [
        format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.history_by_user ({columns}, \
             PRIMARY KEY ((user_id), occurred_at, event_id, item)) {clustering}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.history_by_coupon ({columns}, \
             PRIMARY KEY ((coupon_code), occurred_at, event_id, item)) {clustering}"
        ),
        // Append-only, read by time: time-window compaction (one SSTable
        // per day once the day is over).
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.history_by_time ({columns}, hour timestamp, shard tinyint, \
             PRIMARY KEY ((hour, shard), occurred_at, event_id, item)) {clustering} \
             AND compaction = {{'class': 'TimeWindowCompactionStrategy', 'compaction_window_unit': 'DAYS', 'compaction_window_size': 1}}"
        ),
    ];
    for statement in ddl {
        session
            .query_unpaged(statement, ())
            .await
            .map_err(|e| CassandraError::Schema(Box::new(e)))?;
    }
    Ok(())
}

/// A TLS context trusting the CA certificates of `ca` (PEM) only, and
/// checking the node's certificate against them.
fn tls_context(
    ca: &std::path::Path,
) -> Result<scylla::client::session::OpenSsl010Config, CassandraError> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    use openssl::x509::store::X509StoreBuilder;
    use openssl::x509::X509;
    let pem = std::fs::read(ca).map_err(|source| CassandraError::CaFile {
        path: ca.to_owned(),
        source,
    })?;
    let mut store = X509StoreBuilder::new()?;
    for cert in X509::stack_from_pem(&pem)? {
        store.add_cert(cert)?;
    }
    let mut builder = SslConnector::builder(SslMethod::tls())?;
    builder.set_cert_store(store.build());
    builder.set_verify(SslVerifyMode::PEER);
    Ok(scylla::client::session::OpenSsl010Config::from(builder))
}
