// The dashboard loads the committed ES module build (the server embeds it at compile time, so
// a fresh clone runs without Node). This fails when dist/ is stale against src/: run
// `npm run build` and commit dist/.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');

test('dist/ is the build of src/ (run `npm run build` and commit dist/)', () => {
  const out = mkdtempSync(join(tmpdir(), 'tickfan-build-'));
  try {
    execFileSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', join(root, 'tsconfig.json'), '--outDir', out], { cwd: root });
    for (const f of ['tickfan.js', 'tickfan.d.ts']) {
      assert.equal(readFileSync(join(root, 'dist', f), 'utf8'), readFileSync(join(out, f), 'utf8'), `dist/${f} is stale`);
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
