//! The blacklist's changes and the log: a change reaches `<prefix>.blacklist`
//! only with its commit, and always with it (the outbox and its relay); an
//! entry whose end has passed is lifted, with its event (issue #24, item 13).

use std::time::Duration;

use chrono::Utc;
use prost::Message as _;

use coupon_domain::{EmployeeId, UserId};
use coupon_platform::kafka::Publisher;
use coupon_platform::store::users;
use coupon_platform::KafkaSettings;
use coupon_producers::blacklist::{Blacklist, Source};
use coupon_schemas::BlacklistChanged;
use couponctl::app::Role;

use crate::harness::{eventually_ok, TestEnv};

/// The employee the test's manual changes are made by.
fn operator() -> EmployeeId {
    EmployeeId::parse("e-test").unwrap()
}

fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

/// Every blacklist change on the log, in log order per user.
async fn changes(env: &TestEnv) -> Vec<BlacklistChanged> {
    let mut records = env.read_topic(&env.topics.blacklist()).await;
    records.sort_by_key(|r| (r.partition, r.offset));
    records
        .iter()
        .map(|r| BlacklistChanged::decode(r.value.as_deref().unwrap_or_default()).unwrap())
        .collect()
}

fn of<'a>(changes: &'a [BlacklistChanged], id: &str) -> Vec<&'a BlacklistChanged> {
    changes.iter().filter(|c| c.user_id == id).collect()
}

#[tokio::test]
async fn a_change_whose_commit_fails_is_not_on_the_log() {
    let env = TestEnv::new().await;
    // A check the commit runs (a deferred constraint trigger): every write
    // of `doomed` succeeds, and its transaction fails at COMMIT.
    for ddl in [
        "CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.user_id = 'doomed' THEN RAISE EXCEPTION 'the commit of doomed fails'; END IF;
             RETURN NULL;
         END $$",
        "CREATE CONSTRAINT TRIGGER refuse_doomed AFTER INSERT OR UPDATE ON users
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_doomed()",
    ] {
        sqlx::query(ddl).execute(&env.pool).await.expect(ddl);
    }
    let publisher = Publisher::new(&env.kafka, "test-blacklist").unwrap();
    let blacklist = Blacklist {
        pool: &env.pool,
        publisher: &publisher,
        topics: &env.topics,
    };
    let until = Some(Utc::now() + chrono::Duration::hours(1));
    let failed = blacklist
        .add(&user("doomed"), until, "fraud", Source::Manual(&operator()))
        .await;
    let error = failed.expect_err("the commit fails");
    assert!(format!("{error}").contains("doomed"), "{error}");
    // A change that commits, published after the failed one.
    blacklist
        .add(&user("marker"), until, "fraud", Source::Manual(&operator()))
        .await
        .expect("a change that commits");

    let log = changes(&env).await;
    assert_eq!(
        of(&log, "marker").len(),
        1,
        "the committed change is on the log"
    );
    assert!(
        of(&log, "doomed").is_empty(),
        "a change Postgres never made is on the log: {:?}",
        of(&log, "doomed")
    );
    assert_eq!(
        env.count("SELECT count(*) FROM users WHERE user_id = 'doomed'")
            .await,
        0
    );
    assert_eq!(users::outbox_len(&env.pool).await.unwrap(), 0);
}

#[tokio::test]
async fn a_change_committed_while_the_broker_is_unreachable_reaches_the_log_later() {
    let env = TestEnv::new().await;
    // Nothing listens there: every send fails (after the producer's timeout).
    let away = Publisher::new(&KafkaSettings::new("127.0.0.1:1"), "test-away").unwrap();
    let blacklist = Blacklist {
        pool: &env.pool,
        publisher: &away,
        topics: &env.topics,
    };
    let mallory = user("mallory");
    let until = Some(Utc::now() + chrono::Duration::hours(1));
    let entry = blacklist
        .add(
            &mallory,
            until,
            "chargeback fraud",
            Source::Manual(&operator()),
        )
        .await
        .expect("the change is made though the broker is away");
    assert_eq!(entry.blacklist_reason.as_deref(), Some("chargeback fraud"));
    assert!(blacklist
        .remove(&mallory, Source::Manual(&operator()))
        .await
        .expect("lifted though the broker is away"));
    blacklist
        .add(&mallory, None, "again", Source::Manual(&operator()))
        .await
        .expect("blacklisted again");
    assert_eq!(
        env.count("SELECT count(*) FROM users WHERE user_id = 'mallory' AND blacklisted")
            .await,
        1
    );
    assert!(of(&changes(&env).await, "mallory").is_empty());
    assert_eq!(users::outbox_len(&env.pool).await.unwrap(), 3);

    // A serving process's relay puts them on the log, in commit order.
    let app = env
        .start(&[Role::Gateway], |c| {
            c.blacklist_upkeep_interval = Duration::from_millis(200)
        })
        .await;
    eventually_ok(
        "the waiting changes on the log",
        Duration::from_secs(60),
        || async {
            let log = changes(&env).await;
            let seen: Vec<(bool, String)> = of(&log, "mallory")
                .iter()
                .map(|c| (c.blacklisted, c.reason.clone()))
                .collect();
            let wanted = vec![
                (true, "chargeback fraud".to_owned()),
                (false, String::new()),
                (true, "again".to_owned()),
            ];
            if seen == wanted {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    )
    .await;
    let log = changes(&env).await;
    let mut ids: Vec<&str> = of(&log, "mallory")
        .iter()
        .map(|c| c.envelope.as_ref().unwrap().event_id.as_str())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each change has its own event id");
    eventually_ok("the outbox emptied", Duration::from_secs(10), || async {
        match users::outbox_len(&env.pool).await.unwrap() {
            0 => Ok(()),
            n => Err(format!("{n} rows left")),
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn an_entry_whose_end_passed_is_lifted_and_the_lift_is_on_the_log() {
    let env = TestEnv::new().await;
    let publisher = Publisher::new(&env.kafka, "test-blacklist").unwrap();
    let blacklist = Blacklist {
        pool: &env.pool,
        publisher: &publisher,
        topics: &env.topics,
    };
    let now = Utc::now();
    blacklist
        .add(
            &user("flooder"),
            Some(now + chrono::Duration::seconds(1)),
            "flooding the gateway",
            Source::Automatic,
        )
        .await
        .unwrap();
    blacklist
        .add(
            &user("later"),
            Some(now + chrono::Duration::hours(1)),
            "fraud",
            Source::Manual(&operator()),
        )
        .await
        .unwrap();
    blacklist
        .add(&user("forever"), None, "fraud", Source::Manual(&operator()))
        .await
        .unwrap();

    let app = env
        .start(&[Role::Gateway], |c| {
            c.blacklist_upkeep_interval = Duration::from_millis(200)
        })
        .await;
    eventually_ok(
        "the expired entry lifted",
        Duration::from_secs(30),
        || async {
            let columns = users::blacklist_columns(&env.pool).await.unwrap();
            let flooder = columns.iter().find(|c| c.user_id.as_str() == "flooder");
            let lifted = of(&changes(&env).await, "flooder")
                .last()
                .is_some_and(|c| !c.blacklisted && c.source == "expired");
            match (flooder, lifted) {
                (None, true) => Ok(()),
                (row, lifted) => Err(format!("row {row:?}, lift on the log: {lifted}")),
            }
        },
    )
    .await;
    // The others stay.
    let mut left: Vec<String> = users::blacklist_columns(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.blacklisted)
        .map(|c| c.user_id.to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["forever", "later"]);
    let log = changes(&env).await;
    assert_eq!(of(&log, "later").len(), 1);
    assert_eq!(of(&log, "forever").len(), 1);
    app.stop().await;
}
