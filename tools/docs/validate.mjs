#!/usr/bin/env node
// Validates AsyncAPI documents (JSON or YAML) with @asyncapi/parser.
//
//   node tools/docs/validate.mjs FILE...
//
// Prints every diagnostic (severity, code, message, path) and one OK/FAIL line
// per file. Exits 1 if any file failed to parse or has a diagnostic of error
// severity (0); 2 on bad usage; otherwise 0 (warnings/infos/hints are printed
// but do not fail).
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { Parser } from '@asyncapi/parser';

const SEVERITY = ['error', 'warning', 'info', 'hint'];

const files = process.argv.slice(2);
if (files.length === 0 || files.includes('-h') || files.includes('--help')) {
  console.error('usage: node tools/docs/validate.mjs FILE...');
  process.exit(files.length === 0 ? 2 : 0);
}

function formatPath(p) {
  if (!Array.isArray(p) || p.length === 0) return '#';
  // JSON-pointer style, escaping "~" and "/" inside keys (e.g. channel "a/b").
  return '#/' + p.map((s) => String(s).replace(/~/g, '~0').replace(/\//g, '~1')).join('/');
}

function formatRange(r) {
  if (!r || !r.start) return '';
  return ` (line ${r.start.line + 1}, col ${r.start.character + 1})`;
}

const parser = new Parser();
let failed = false;

for (const file of files) {
  let text;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    console.log(`FAIL ${file}: cannot read: ${err.message}`);
    failed = true;
    continue;
  }
  let result;
  try {
    result = await parser.parse(text, { source: path.resolve(file) });
  } catch (err) {
    console.log(`FAIL ${file}: parser threw: ${err && err.message ? err.message : err}`);
    failed = true;
    continue;
  }
  const diagnostics = result.diagnostics || [];
  let errors = 0;
  let warnings = 0;
  for (const d of diagnostics) {
    const sev = SEVERITY[d.severity] ?? `severity-${d.severity}`;
    if (d.severity === 0) errors++;
    else if (d.severity === 1) warnings++;
    console.log(`  ${sev} [${d.code}] ${d.message} at ${formatPath(d.path)}${formatRange(d.range)}`);
  }
  const counts = `${errors} error(s), ${warnings} warning(s), ${diagnostics.length} diagnostic(s)`;
  if (!result.document) {
    console.log(`FAIL ${file}: document did not parse (${counts})`);
    failed = true;
  } else if (errors > 0) {
    console.log(`FAIL ${file}: ${counts}`);
    failed = true;
  } else {
    const info = result.document.info();
    console.log(`OK ${file}: AsyncAPI ${result.document.version()} "${info.title()}" ${info.version()} (${counts})`);
  }
}

process.exit(failed ? 1 : 0);
