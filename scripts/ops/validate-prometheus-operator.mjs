// Validates ServiceMonitor and PrometheusRule objects against the
// prometheus-operator CRD schemas of @kubernetes-models/prometheus-operator
// (kubernetes-validate only warns on kinds it does not know).
//   node validate-prometheus-operator.mjs OBJECTS.json
// OBJECTS.json is a JSON array of manifests; other kinds are an error, so a
// typo in apiVersion or kind cannot slip through unvalidated.
// Prints one line per object; exits 1 if any is invalid.
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { ServiceMonitor, PrometheusRule };
const objects = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const obj of objects) {
  const name = `${obj.kind}/${obj.metadata?.name}`;
  const Model = models[obj.kind];
  try {
    if (!Model || obj.apiVersion !== Model.apiVersion) {
      throw new Error(`not a prometheus-operator kind this check knows: ${obj.apiVersion} ${obj.kind}`);
    }
    new Model(obj).validate();
    console.log(`${name}: valid`);
  } catch (e) {
    failed++;
    const details = e.errors ? JSON.stringify(e.errors) : "";
    console.log(`${name}: INVALID: ${e.message} ${details}`);
  }
}
process.exit(failed ? 1 : 0);
