/*
 * The C twin of `jointdiff denoise`: sets up a session from command-line options that mirror the CLI's and
 * writes the raw float32 outputs, so that frontends/capi/tests/c_program.rs can compare the C API with the
 * CLI byte for byte over every rule, operator kind, noise prior and K > 1.
 *
 *   denoise_twin Y.raw N C H W OUT_PREFIX [OPTION VALUE...]
 *
 * Options (values as the CLI's): --signal-model PATH | --signal-stats RAW C H W (mean then variance),
 * --noise-model PATH | --noise-gaussian STD MEAN | --noise-sine STD, --operator-scale B,
 * --operator-mask RAW (C*H*W values), --operator-matrix RAW M D, --alpha A, --rule projection|dps|pigdm,
 * --steps N, --samples K, --seed S, --signal-shape C H W, --eps E.
 * Writes OUT_PREFIX.signal, OUT_PREFIX.noise and (K > 1) OUT_PREFIX.std.
 */
#include "jointdiff.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float *read_raw(const char *path, size_t want) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  float *buf = malloc(want * sizeof(float));
  size_t got = buf ? fread(buf, sizeof(float), want, f) : 0;
  fclose(f);
  if (got != want) {
    free(buf);
    return NULL;
  }
  return buf;
}

static int write_raw(const char *prefix, const char *ext, const float *data, size_t len) {
  char path[4096];
  snprintf(path, sizeof path, "%s.%s", prefix, ext);
  FILE *f = fopen(path, "wb");
  if (!f) return 0;
  size_t w = fwrite(data, sizeof(float), len, f);
  fclose(f);
  return w == len;
}

static int fail(const char *what, jd_status st) {
  fprintf(stderr, "%s: status %d: %s\n", what, (int)st, jd_last_error());
  return 1;
}

#define CALL(what, expr)                      \
  do {                                        \
    jd_status st_ = (expr);                   \
    if (st_ != JD_OK) return fail(what, st_); \
  } while (0)

int main(int argc, char **argv) {
  if (argc < 7) {
    fprintf(stderr, "usage: %s Y.raw N C H W OUT_PREFIX [OPTION VALUE...]\n", argv[0]);
    return 2;
  }
  size_t n = strtoul(argv[2], NULL, 10), c = strtoul(argv[3], NULL, 10);
  size_t h = strtoul(argv[4], NULL, 10), w = strtoul(argv[5], NULL, 10);
  const char *prefix = argv[6];
  size_t total = n * c * h * w;
  float *y = read_raw(argv[1], total);
  if (!y) return fail("read measurement", JD_ERR_IO);
  jd_session *s = NULL;
  jd_model *models[2] = {NULL, NULL};
  int nmodels = 0;
  uint64_t seed = 0;
  uint32_t samples = 1;
  float *bufs[3] = {NULL, NULL, NULL};
  CALL("create", jd_session_create(&s));
  for (int i = 7; i < argc; i++) {
    const char *o = argv[i];
#define ARG(k) (i + (k) < argc ? argv[i + (k)] : "")
    if (!strcmp(o, "--signal-model") || !strcmp(o, "--noise-model")) {
      jd_model *m = NULL;
      CALL("load", jd_model_load(ARG(1), &m));
      models[nmodels++] = m;
      if (o[2] == 's')
        CALL("signal model", jd_session_set_signal_model(s, m));
      else
        CALL("noise model", jd_session_set_noise_model(s, m));
      i += 1;
    } else if (!strcmp(o, "--signal-stats")) {
      size_t sc = strtoul(ARG(2), NULL, 10), sh = strtoul(ARG(3), NULL, 10), sw = strtoul(ARG(4), NULL, 10);
      float *st = read_raw(ARG(1), 2 * sc * sh * sw);
      if (!st) return fail("read stats", JD_ERR_IO);
      CALL("signal stats", jd_session_set_signal_gaussian(s, st, st + sc * sh * sw, sc, sh, sw));
      free(st);
      i += 4;
    } else if (!strcmp(o, "--noise-gaussian")) {
      CALL("noise gaussian", jd_session_set_noise_gaussian(s, strtof(ARG(1), NULL), strtof(ARG(2), NULL)));
      i += 2;
    } else if (!strcmp(o, "--noise-sine")) {
      CALL("noise sine", jd_session_set_noise_sine(s, strtod(ARG(1), NULL)));
      i += 1;
    } else if (!strcmp(o, "--operator-scale")) {
      CALL("scale", jd_session_set_operator_scale(s, strtof(ARG(1), NULL)));
      i += 1;
    } else if (!strcmp(o, "--operator-mask")) {
      float *mk = read_raw(ARG(1), c * h * w);
      if (!mk) return fail("read mask", JD_ERR_IO);
      CALL("mask", jd_session_set_operator_mask(s, mk, c * h * w));
      free(mk);
      i += 1;
    } else if (!strcmp(o, "--operator-matrix")) {
      size_t m = strtoul(ARG(2), NULL, 10), d = strtoul(ARG(3), NULL, 10);
      float *a = read_raw(ARG(1), m * d);
      if (!a) return fail("read matrix", JD_ERR_IO);
      CALL("matrix", jd_session_set_operator_matrix(s, a, m, d));
      free(a);
      i += 3;
    } else if (!strcmp(o, "--alpha")) {
      CALL("alpha", jd_session_set_alpha(s, strtod(ARG(1), NULL)));
      i += 1;
    } else if (!strcmp(o, "--rule")) {
      const char *r = ARG(1);
      int rule = !strcmp(r, "dps") ? JD_RULE_DPS : !strcmp(r, "pigdm") ? JD_RULE_PIGDM : JD_RULE_PROJECTION;
      CALL("rule", jd_session_set_rule(s, rule));
      i += 1;
    } else if (!strcmp(o, "--steps")) {
      CALL("steps", jd_session_set_steps(s, (uint32_t)strtoul(ARG(1), NULL, 10)));
      i += 1;
    } else if (!strcmp(o, "--eps")) {
      CALL("eps", jd_session_set_eps(s, strtod(ARG(1), NULL)));
      i += 1;
    } else if (!strcmp(o, "--samples")) {
      samples = (uint32_t)strtoul(ARG(1), NULL, 10);
      CALL("samples", jd_session_set_samples(s, samples));
      i += 1;
    } else if (!strcmp(o, "--seed")) {
      seed = strtoull(ARG(1), NULL, 10);
      i += 1;
    } else if (!strcmp(o, "--signal-shape")) {
      CALL("signal shape", jd_session_set_signal_shape(s, strtoul(ARG(1), NULL, 10), strtoul(ARG(2), NULL, 10),
                                                       strtoul(ARG(3), NULL, 10)));
      i += 3;
    } else {
      fprintf(stderr, "unknown option %s\n", o);
      return 2;
    }
#undef ARG
  }
  size_t sl = 0;
  CALL("signal length", jd_denoise_signal_len(s, n, c, h, w, &sl));
  bufs[0] = calloc(sl, sizeof(float));
  bufs[1] = calloc(total, sizeof(float));
  bufs[2] = samples > 1 ? calloc(sl, sizeof(float)) : NULL;
  CALL("denoise", jd_denoise(s, y, n, c, h, w, seed, bufs[0], sl, bufs[1], total, bufs[2], bufs[2] ? sl : 0));
  int ok = write_raw(prefix, "signal", bufs[0], sl) && write_raw(prefix, "noise", bufs[1], total) &&
           (!bufs[2] || write_raw(prefix, "std", bufs[2], sl));
  for (int k = 0; k < 3; k++) free(bufs[k]);
  for (int k = 0; k < nmodels; k++) jd_model_destroy(&models[k]);
  jd_session_destroy(&s);
  free(y);
  return ok ? 0 : 1;
}
