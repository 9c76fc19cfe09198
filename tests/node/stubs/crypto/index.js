'use strict';
// Never loaded by Node: require('crypto') resolves to the core module first.
module.exports = require('node:crypto');
