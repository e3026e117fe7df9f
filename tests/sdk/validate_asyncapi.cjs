// Validates an AsyncAPI document with the AsyncAPI initiative's own parser
// (schema and semantic rules: references resolve, reply messages belong to
// their channel, operation actions, ...). Fails on any error or warning.
//
//   node validate_asyncapi.cjs NODE_DIR asyncapi.yaml
//
// NODE_DIR is where tests/sdk/run.sh installed package-lock.json's
// packages, outside the repository.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');

const [nodeDir, file] = process.argv.slice(2);
const load = createRequire(path.join(path.resolve(nodeDir), 'package.json'));
const { Parser, DiagnosticSeverity } = load('@asyncapi/parser');

async function main() {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(file, 'utf8'), {
    source: path.resolve(file),
  });
  let failed = document === undefined;
  for (const d of diagnostics) {
    const serious = d.severity <= DiagnosticSeverity.Warning;
    failed ||= serious;
    // Informational hints (e.g. "3.1.0 exists") are shown but do not fail.
    console.log(`${serious ? 'ERROR' : 'note '} ${d.code} at ${d.path.join('.') || '/'}: ${d.message}`);
  }
  if (failed) {
    console.log(`${file}: invalid AsyncAPI document`);
    process.exit(1);
  }
  console.log(`${file}: valid AsyncAPI ${document.version()}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
