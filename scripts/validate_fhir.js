// Validates FHIR R4 JSON files (Bundles: each entry's resource too) with npm fhir@4.12.0.
// Usage: node scripts/validate_fhir.js FILES... ; install: scripts/install-test-tools
// (npm fhir@4.12.0 into scripts/node_modules, pinned by scripts/package-lock.json)
const fs = require('fs');
let Fhir;
try { ({ Fhir } = require(require('path').join(__dirname, 'node_modules', 'fhir'))); } catch (e) {
  console.error('npm package fhir@4.12.0 missing: run scripts/install-test-tools');
  process.exit(2);
}
const fhir = new Fhir();
let bad = 0;
const files = process.argv.slice(2);
for (const f of files) {
  const data = JSON.parse(fs.readFileSync(f, 'utf8'));
  const problems = [];
  const check = (res, where) => {
    const r = fhir.validate(res, { errorOnUnexpected: true });
    for (const m of r.messages || []) {
      if (m.severity === 'error') problems.push(`${where}: ${m.location}: ${m.message}`);
    }
  };
  check(data, 'Bundle');
  // a DELETE entry has no resource
  (data.entry || []).forEach((e, i) => e.resource && check(e.resource, `entry[${i}] ${e.resource.resourceType}`));
  if (problems.length) {
    bad++;
    console.log(`INVALID ${f}`);
    problems.slice(0, 20).forEach((p) => console.log(`   ${p}`));
  }
}
console.log(`fhir@4.12.0: ${files.length - bad}/${files.length} valid`);
process.exit(bad ? 1 : 0);
