// The ACL set of one deployment (infra/kafka/acls.tsv) onto a cluster, in
// one JVM: run through infra/kafka/acls.sh (Java's single-file source mode,
// on the broker's kafka-clients jar), not by hand.
//
//   Acls apply  TABLE PREFIX ADMIN_PROPERTIES [ROLE=PRINCIPAL ...]
//   Acls print  TABLE PREFIX [ROLE=PRINCIPAL ...]
//
// `apply` creates every binding through the admin API (CreateAcls is
// idempotent: a binding that exists stays as it is) and lists what the
// cluster then holds for the prefix; `print` writes one kafka-acls.sh command
// per line of the table instead. A principal is User:<role> unless mapped
// (e.g. storefront=User:CN=storefront.shop.example for mTLS).

import java.io.FileInputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class Acls {
    record Line(String principal, ResourceType type, PatternType pattern, String name,
                List<AclOperation> operations) {}

    public static void main(String[] args) throws Exception {
        if (args.length < 3 || !(args[0].equals("apply") || args[0].equals("print"))) {
            die("usage: Acls apply TABLE PREFIX ADMIN_PROPERTIES [ROLE=PRINCIPAL ...] | print TABLE PREFIX [ROLE=PRINCIPAL ...]");
        }
        boolean apply = args[0].equals("apply");
        if (apply && args.length < 4) die("apply needs the admin client's properties file");
        Map<String, String> principals = new HashMap<>();
        for (int i = apply ? 4 : 3; i < args.length; i++) {
            String[] kv = args[i].split("=", 2);
            if (kv.length != 2) die("not ROLE=PRINCIPAL: " + args[i]);
            principals.put(kv[0], kv[1]);
        }
        List<Line> lines = parse(Path.of(args[1]), args[2], principals);
        if (!apply) {
            for (Line line : lines) System.out.println(command(line));
            return;
        }
        List<AclBinding> bindings = new ArrayList<>();
        for (Line line : lines) {
            for (AclOperation op : line.operations()) {
                bindings.add(new AclBinding(
                    new ResourcePattern(line.type(), line.name(), line.pattern()),
                    new AccessControlEntry(line.principal(), "*", op, AclPermissionType.ALLOW)));
            }
        }
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[3])) {
            props.load(in);
        }
        try (Admin admin = Admin.create(props)) {
            admin.createAcls(bindings).all().get();
        }
        System.out.println("applied " + bindings.size() + " ACLs for prefix " + args[2]);
    }

    static List<Line> parse(Path table, String prefix, Map<String, String> principals) throws Exception {
        if (prefix.isEmpty()) die("the topic prefix is empty");
        List<Line> lines = new ArrayList<>();
        int number = 0;
        for (String raw : Files.readAllLines(table)) {
            number++;
            String text = raw.strip();
            if (text.isEmpty() || text.startsWith("#")) continue;
            String[] f = text.split("\\s+");
            if (f.length != 5) die(table + ":" + number + ": want 5 columns, got " + f.length);
            ResourceType type = switch (f[1]) {
                case "topic" -> ResourceType.TOPIC;
                case "group" -> ResourceType.GROUP;
                default -> die(table + ":" + number + ": resource is topic or group, not " + f[1]);
            };
            PatternType pattern = switch (f[2]) {
                case "literal" -> PatternType.LITERAL;
                case "prefixed" -> PatternType.PREFIXED;
                default -> die(table + ":" + number + ": pattern is literal or prefixed, not " + f[2]);
            };
            List<AclOperation> ops = new ArrayList<>();
            for (String op : f[4].split(",")) {
                AclOperation parsed = AclOperation.fromString(
                    op.replaceAll("([a-z])([A-Z])", "$1_$2").toUpperCase(Locale.ROOT));
                if (parsed == AclOperation.UNKNOWN || parsed == AclOperation.ANY || parsed == AclOperation.ALL) {
                    die(table + ":" + number + ": not an operation for this table: " + op);
                }
                ops.add(parsed);
            }
            String principal = principals.getOrDefault(f[0], "User:" + f[0]);
            lines.add(new Line(principal, type, pattern, f[3].replace("{prefix}", prefix), ops));
        }
        return lines;
    }

    static String command(Line line) {
        StringBuilder out = new StringBuilder("kafka-acls.sh --bootstrap-server \"$BOOTSTRAP\" --command-config \"$ADMIN_CONFIG\" --add");
        out.append(" --allow-principal '").append(line.principal()).append("'");
        for (AclOperation op : line.operations()) {
            String name = op.name().toLowerCase(Locale.ROOT);
            StringBuilder camel = new StringBuilder();
            for (String part : name.split("_")) {
                camel.append(Character.toUpperCase(part.charAt(0))).append(part.substring(1));
            }
            out.append(" --operation ").append(camel);
        }
        out.append(line.type() == ResourceType.TOPIC ? " --topic '" : " --group '").append(line.name()).append("'");
        out.append(" --resource-pattern-type ").append(line.pattern().name().toLowerCase(Locale.ROOT));
        return out.toString();
    }

    static <T> T die(String message) {
        System.err.println("error: " + message);
        System.exit(2);
        return null;
    }
}
