package storefront;

import com.google.protobuf.InvalidProtocolBufferException;
import coupons.v1.Events.ClaimDecided;
import coupons.v1.Events.ClaimOutcome;
import coupons.v1.Events.ClaimRequested;
import coupons.v1.Events.DeadLetter;
import coupons.v1.Events.Envelope;
import coupons.v1.Events.PurchaseDecided;
import coupons.v1.Events.PurchaseOutcome;
import coupons.v1.Events.PurchaseRequested;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.UUID;
import java.util.function.BooleanSupplier;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * A storefront backend that claims coupons and buys one by publishing straight to Kafka, as a
 * foreign producer must (README, "Publishing claims directly"):
 *
 * <ul>
 *   <li>key: the user id (UTF-8), so that one user's requests share a partition and are decided
 *       in order by one claim processor; the Java client's default partitioner (murmur2) is the
 *       one the system's own producers use too;
 *   <li>value: one protobuf message of package {@code coupons.v1} whose {@code envelope} has a
 *       unique {@code event_id}, {@code occurred_at_ms}, {@code producer}, {@code schema_version}
 *       1 and {@code event_type} the message's full name; no record headers are read;
 *   <li>a {@code request_id} of the requester's choosing, which the decision carries back: a
 *       decision answers request id <em>and</em> user id.
 * </ul>
 *
 * <p>It publishes one claim per user, waits for each decision on {@code <prefix>.claim-results},
 * publishes one claim again with the same request id (the same decision comes back), buys the
 * first granted coupon ({@code <prefix>.purchase-results}), then makes the two kinds of mistake:
 * a claim without a user id (answered {@code INVALID}) and one without an envelope (set aside on
 * {@code <prefix>.dead-letter}, never answered). It prints what it saw and exits 1 if any
 * decision is missing, duplicated or not what the system promises.
 */
public final class Storefront implements AutoCloseable {
  static final String PRODUCER = "java-storefront";

  public static void main(String[] args) throws Exception {
    Options options;
    try {
      options = Options.parse(args);
    } catch (IllegalArgumentException e) {
      System.err.println("error: " + e.getMessage());
      System.err.println(Options.USAGE);
      System.exit(2);
      return;
    }
    boolean ok;
    try (Storefront storefront = new Storefront(options)) {
      ok = storefront.run();
    } catch (IllegalStateException e) {
      System.out.println("FAILED: " + e.getMessage());
      System.out.println("java-storefront: failed");
      ok = false;
    }
    System.exit(ok ? 0 : 1);
  }

  private final Options options;
  private final KafkaProducer<String, byte[]> producer;
  private final Answers answers;
  private final List<String> failures = new ArrayList<>();

  Storefront(Options options) {
    this.options = options;
    Properties props = new Properties();
    props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, options.brokers);
    props.put(ProducerConfig.ACKS_CONFIG, "all");
    props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
    props.put(ProducerConfig.CLIENT_ID_CONFIG, PRODUCER);
    // The default partitioner: keyed records go to murmur2(key) % partitions.
    props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
    props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    this.producer = new KafkaProducer<>(props);
    this.answers = new Answers(options);
  }

  @Override
  public void close() {
    producer.close(Duration.ofSeconds(10));
    answers.close();
  }

  private static Envelope envelope(String eventType, String correlationId) {
    return Envelope.newBuilder()
        .setEventId(UUID.randomUUID().toString())
        .setOccurredAtMs(System.currentTimeMillis())
        .setProducer(PRODUCER)
        .setSchemaVersion(1)
        .setEventType(eventType)
        .setCorrelationId(correlationId)
        .build();
  }

  static ClaimRequested claim(String requestId, String userId, String category) {
    return ClaimRequested.newBuilder()
        .setEnvelope(envelope(ClaimRequested.getDescriptor().getFullName(), requestId))
        .setRequestId(requestId)
        .setUserId(userId)
        .setCategory(category)
        .build();
  }

  static PurchaseRequested purchase(
      String requestId, String userId, String couponCode, String orderId) {
    return PurchaseRequested.newBuilder()
        .setEnvelope(envelope(PurchaseRequested.getDescriptor().getFullName(), requestId))
        .setRequestId(requestId)
        .setUserId(userId)
        .setCouponCode(couponCode)
        .setOrderId(orderId)
        .build();
  }

  private RecordMetadata publish(String topic, String key, byte[] value) throws Exception {
    return producer.send(new ProducerRecord<>(topic, key, value)).get();
  }

  private void check(boolean ok, String failure) {
    if (!ok) {
      failures.add(failure);
      System.out.println("FAILED: " + failure);
    }
  }

  private record Sent(String user, String requestId, int partition) {}

  boolean run() throws Exception {
    String claims = options.topic("claims");
    System.out.printf(
        "java-storefront: %d claims to %s on %s%n", options.users, claims, options.brokers);

    List<Sent> sent = new ArrayList<>();
    for (int i = 0; i < options.users; i++) {
      String user = options.userPrefix + i;
      String requestId = UUID.randomUUID().toString();
      RecordMetadata at =
          publish(claims, user, claim(requestId, user, options.category).toByteArray());
      sent.add(new Sent(user, requestId, at.partition()));
    }

    answers.await(
        "a decision for every claim",
        () -> sent.stream().allMatch(s -> !answers.claims(s.requestId, s.user).isEmpty()));

    Map<String, Integer> tally = new TreeMap<>();
    Sent firstGranted = null;
    ClaimDecided firstGrant = null;
    System.out.println("user                  partition  outcome       coupon         held until");
    for (Sent s : sent) {
      Collection<ClaimDecided> decided = answers.distinctClaims(s.requestId, s.user);
      check(
          decided.size() == 1,
          s.user + " got " + decided.size() + " different decisions for one claim");
      ClaimDecided d = decided.iterator().next();
      String outcome = name(d.getOutcome());
      tally.merge(outcome, 1, Integer::sum);
      boolean granted = d.getOutcome() == ClaimOutcome.CLAIM_OUTCOME_GRANTED;
      check(
          granted == !d.getCouponCode().isEmpty(),
          s.user + ": " + outcome + " with coupon code '" + d.getCouponCode() + "'");
      check(
          d.getOutcome() == ClaimOutcome.CLAIM_OUTCOME_GRANTED
              || d.getOutcome() == ClaimOutcome.CLAIM_OUTCOME_SOLD_OUT,
          s.user + ": a fresh user's claim was answered " + outcome);
      if (granted && firstGranted == null) {
        firstGranted = s;
        firstGrant = d;
      }
      System.out.printf(
          "%-21s %9d  %-13s %-14s %s%n",
          s.user,
          s.partition,
          outcome,
          d.getCouponCode(),
          granted ? Instant.ofEpochMilli(d.getExpiresAtMs()) : "");
    }
    StringBuilder counts = new StringBuilder();
    tally.forEach((k, v) -> counts.append(counts.length() == 0 ? "" : ", ").append(v + " " + k));
    System.out.printf(
        "decisions: %d claims, each answered exactly once: %s%n", sent.size(), counts);

    if (firstGranted == null) {
      check(false, "no claim was granted (were coupons released?)");
      return summary();
    }

    // The same request id again: the stored decision comes back unchanged
    // (the same event, same coupon), however often it is sent.
    Sent again = firstGranted;
    publish(claims, again.user, claim(again.requestId, again.user, options.category).toByteArray());
    answers.await(
        "the decision for the repeated claim",
        () -> answers.claims(again.requestId, again.user).size() >= 2);
    List<ClaimDecided> both = answers.claims(again.requestId, again.user);
    ClaimDecided repeat = both.get(both.size() - 1);
    boolean same =
        repeat.getEnvelope().getEventId().equals(firstGrant.getEnvelope().getEventId())
            && repeat.getOutcome() == firstGrant.getOutcome()
            && repeat.getCouponCode().equals(firstGrant.getCouponCode());
    check(same, "the repeated request " + again.requestId + " got another decision: " + repeat);
    System.out.printf(
        "repeat: request %s of %s published again: %s (%s %s, event %s)%n",
        again.requestId,
        again.user,
        same ? "same decision" : "DIFFERENT decision",
        name(repeat.getOutcome()),
        repeat.getCouponCode(),
        repeat.getEnvelope().getEventId());

    // Buy the held coupon: keyed by the user id too, idempotent on order_id.
    String purchases = options.topic("purchases");
    String purchaseId = UUID.randomUUID().toString();
    String orderId = "order-" + UUID.randomUUID();
    String code = firstGrant.getCouponCode();
    publish(
        purchases, again.user, purchase(purchaseId, again.user, code, orderId).toByteArray());
    answers.await(
        "the purchase's decision", () -> !answers.purchases(purchaseId, again.user).isEmpty());
    PurchaseDecided bought = answers.purchases(purchaseId, again.user).get(0);
    check(
        bought.getOutcome() == PurchaseOutcome.PURCHASE_OUTCOME_REDEEMED
            && bought.getOrderId().equals(orderId)
            && bought.getCouponCode().equals(code),
        "the purchase of " + code + " was answered " + bought);
    System.out.printf(
        "purchase: order %s of %s for %s: %s%n",
        orderId, again.user, code, name(bought.getOutcome()));

    if (options.mistakes) {
      mistakes(claims);
    }
    return summary();
  }

  /** The two kinds of mistake a foreign producer can make, and what it gets for each. */
  private void mistakes(String claims) throws Exception {
    // A decodable claim with a bad field: answered INVALID with the reason,
    // addressed to the user id it gave (here none), and set aside.
    String invalidId = UUID.randomUUID().toString();
    publish(claims, "", claim(invalidId, "", "").toByteArray());
    answers.await("the INVALID answer", () -> !answers.claims(invalidId, "").isEmpty());
    ClaimDecided invalid = answers.claims(invalidId, "").get(0);
    check(
        invalid.getOutcome() == ClaimOutcome.CLAIM_OUTCOME_INVALID,
        "a claim without user id was answered " + invalid);
    System.out.printf(
        "mistake: claim without user_id: %s (%s)%n", name(invalid.getOutcome()), invalid.getReason());

    // No envelope: the record cannot be trusted at all, so nobody is
    // answered; it lands on the dead-letter topic with its reason.
    String lostId = UUID.randomUUID().toString();
    ClaimRequested bare =
        ClaimRequested.newBuilder().setRequestId(lostId).setUserId(options.userPrefix + "x").build();
    RecordMetadata at = publish(claims, options.userPrefix + "x", bare.toByteArray());
    answers.await(
        "the dead letter of the claim without envelope",
        () -> answers.deadLetter(claims, at.partition(), at.offset()) != null);
    DeadLetter letter = answers.deadLetter(claims, at.partition(), at.offset());
    check(
        answers.claims(lostId, options.userPrefix + "x").isEmpty(),
        "a claim without envelope was answered");
    System.out.printf(
        "mistake: claim without envelope: dead letter on %s (%s), no answer%n",
        options.topic("dead-letter"), letter.getReason());
  }

  private boolean summary() {
    if (failures.isEmpty()) {
      System.out.println("java-storefront: ok");
      return true;
    }
    System.out.println("java-storefront: " + failures.size() + " check(s) failed");
    return false;
  }

  static String name(ClaimOutcome outcome) {
    return outcome.name().replace("CLAIM_OUTCOME_", "");
  }

  static String name(PurchaseOutcome outcome) {
    return outcome.name().replace("PURCHASE_OUTCOME_", "");
  }

  /**
   * Reads the results and dead-letter topics from their ends as they were before anything was
   * published, and keeps every answer by request id and user id.
   */
  static final class Answers implements AutoCloseable {
    private final Options options;
    private final KafkaConsumer<String, byte[]> consumer;
    private final Map<String, List<ClaimDecided>> claims = new HashMap<>();
    private final Map<String, List<PurchaseDecided>> purchases = new HashMap<>();
    private final Map<String, DeadLetter> deadLetters = new HashMap<>();

    Answers(Options options) {
      this.options = options;
      Properties props = new Properties();
      props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, options.brokers);
      props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
      props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
      props.put(
          ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
      consumer = new KafkaConsumer<>(props);
      List<TopicPartition> partitions = new ArrayList<>();
      for (String topic :
          List.of(
              options.topic("claim-results"),
              options.topic("purchase-results"),
              options.topic("dead-letter"))) {
        var infos = consumer.partitionsFor(topic, Duration.ofSeconds(30));
        if (infos == null || infos.isEmpty()) {
          throw new IllegalStateException("topic " + topic + " does not exist (is the system up?)");
        }
        infos.forEach(p -> partitions.add(new TopicPartition(topic, p.partition())));
      }
      consumer.assign(partitions);
      consumer.seekToEnd(partitions);
      // Resolve the end offsets now, before the first request is published.
      partitions.forEach(p -> consumer.position(p, Duration.ofSeconds(30)));
    }

    private static String key(String requestId, String userId) {
      return requestId + "\u0000" + userId;
    }

    List<ClaimDecided> claims(String requestId, String userId) {
      return claims.getOrDefault(key(requestId, userId), List.of());
    }

    /** Distinct decisions: a decision republished after a redelivery has the same event id. */
    Collection<ClaimDecided> distinctClaims(String requestId, String userId) {
      Map<String, ClaimDecided> byEvent = new LinkedHashMap<>();
      claims(requestId, userId).forEach(d -> byEvent.put(d.getEnvelope().getEventId(), d));
      return byEvent.values();
    }

    List<PurchaseDecided> purchases(String requestId, String userId) {
      return purchases.getOrDefault(key(requestId, userId), List.of());
    }

    DeadLetter deadLetter(String topic, int partition, long offset) {
      return deadLetters.get(topic + "/" + partition + "/" + offset);
    }

    void await(String what, BooleanSupplier done) {
      long deadline = System.nanoTime() + options.timeout.toNanos();
      while (!done.getAsBoolean()) {
        if (System.nanoTime() > deadline) {
          throw new IllegalStateException("timed out after " + options.timeout + " waiting for " + what);
        }
        for (ConsumerRecord<String, byte[]> r : consumer.poll(Duration.ofMillis(100))) {
          take(r);
        }
      }
    }

    private void take(ConsumerRecord<String, byte[]> r) {
      try {
        if (r.topic().equals(options.topic("claim-results"))) {
          ClaimDecided d = ClaimDecided.parseFrom(r.value());
          claims.computeIfAbsent(key(d.getRequestId(), d.getUserId()), k -> new ArrayList<>()).add(d);
        } else if (r.topic().equals(options.topic("purchase-results"))) {
          PurchaseDecided d = PurchaseDecided.parseFrom(r.value());
          purchases
              .computeIfAbsent(key(d.getRequestId(), d.getUserId()), k -> new ArrayList<>())
              .add(d);
        } else {
          DeadLetter d = DeadLetter.parseFrom(r.value());
          deadLetters.put(
              d.getSourceTopic() + "/" + d.getSourcePartition() + "/" + d.getSourceOffset(), d);
        }
      } catch (InvalidProtocolBufferException e) {
        // Not ours to judge: another producer's record.
      }
    }

    @Override
    public void close() {
      consumer.close(Duration.ofSeconds(5));
    }
  }

  static final class Options {
    static final String USAGE =
        "usage: storefront [--brokers HOST:PORT] [--prefix TOPIC_PREFIX] [--users N]"
            + " [--user-prefix P] [--category C] [--timeout SECONDS] [--no-mistakes]\n"
            + "  defaults: $KAFKA_BROKERS or 127.0.0.1:9092, $COUPON_TOPIC_PREFIX or coupons,"
            + " 10 users named java-user-<i>, any category, 60 s";
    String brokers = env("KAFKA_BROKERS", "127.0.0.1:9092");
    String prefix = env("COUPON_TOPIC_PREFIX", "coupons");
    int users = 10;
    String userPrefix = "java-user-";
    String category = "";
    Duration timeout = Duration.ofSeconds(60);
    boolean mistakes = true;

    private static String env(String name, String fallback) {
      String value = System.getenv(name);
      return value == null || value.isEmpty() ? fallback : value;
    }

    String topic(String name) {
      return prefix + "." + name;
    }

    static Options parse(String[] args) {
      Options o = new Options();
      for (int i = 0; i < args.length; i++) {
        String flag = args[i];
        if (flag.equals("--no-mistakes")) {
          o.mistakes = false;
          continue;
        }
        if (i + 1 >= args.length) {
          throw new IllegalArgumentException(flag + " needs a value");
        }
        String value = args[++i];
        try {
          switch (flag) {
            case "--brokers" -> o.brokers = value;
            case "--prefix" -> o.prefix = value;
            case "--users" -> o.users = Integer.parseInt(value);
            case "--user-prefix" -> o.userPrefix = value;
            case "--category" -> o.category = value;
            case "--timeout" -> o.timeout = Duration.ofSeconds(Long.parseLong(value));
            default -> throw new IllegalArgumentException("unknown flag " + flag);
          }
        } catch (NumberFormatException e) {
          throw new IllegalArgumentException(flag + " needs a number, not " + value);
        }
      }
      if (o.users < 1) {
        throw new IllegalArgumentException("--users must be at least 1");
      }
      return o;
    }
  }
}
